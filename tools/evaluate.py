"""Loss, perplexity and bits per byte of a model on text files.

    # a training run's newest (or --step) checkpoint, or a tools/convert_hf.py import workdir
    python tools/evaluate.py --workdir=runs/tiny --data=/data/wikitext2_valid.txt
    # a Hugging Face Llama directory, read directly (config.json, *.safetensors, tokenizer)
    python tools/evaluate.py --hf_dir=~/models/TinyLlama-1.1B \\
        --data='/data/wiki/*.txt,notes.jsonl' [--stride=512] [--seq_len=2048] \\
        [--batch_size=8] [--json=out.json]

Each comma-separated `--data` entry (a file, glob or directory; text files are one document
each, JSONL/Parquet one per record with `--text_field`) is reported on its own, then all
together. Windows: non-overlapping windows of the model's length (a run's train.seq_len, else
the model's max_seq_len, or --seq_len), the last one reaching back to a full window — what
lm-eval's rolling log-likelihood does; `--stride=S` slides windows by S tokens, scoring only the
new ones, so each token sees at least seq_len - S tokens of context. See jaxlm/evaluate/text.py.

For a training run, each file that belongs to the run's corpus is checked against the run's
content-hash split: documents it trained on are counted (`trained_on` in --json) and flagged,
since their loss measures recall rather than generalisation (jaxlm/evaluate/seen.py).

The numbers are the same whichever way the model arrived: a Hugging Face directory and its
import give the same weights, windows and scores (tests/test_evaluate_text.py checks them
against transformers within 0.1%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jaxlm import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run's or an import's --workdir")
    src.add_argument("--hf_dir", help="a Hugging Face Llama directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--data", required=True, help="comma-separated files, globs or directories")
    p.add_argument("--text_field", default="text", help="JSONL key / Parquet column of the text")
    p.add_argument("--seq_len", type=int, default=0, help="window length; 0 = the model's")
    p.add_argument("--stride", type=int, default=0, help="window stride; 0 = seq_len (disjoint)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p.parse_args(argv)


class Bar:
    """A progress bar on stderr: redrawn in place on a terminal, one line per dataset else."""

    def __init__(self, label: str):
        self.label, self.start, self.tty = label, time.perf_counter(), sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        line = (
            f"  {self.label} [{'#' * (30 * done // total):<30}] {done}/{total} rows "
            f"{time.perf_counter() - self.start:.1f} s"
        )
        if self.tty:
            print("\r" + line, end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == total:
            print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from jaxlm.errors import JaxlmError

    try:
        results = evaluate(args)
    except JaxlmError as e:
        if os.environ.get("JAXLM_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, r in results["data"].items():
        documents = f"{r['documents']:,} document{'s' if r['documents'] != 1 else ''}"
        print(
            f"{name}: loss {r['loss']:.4f} | ppl {r['perplexity']:.3f} | "
            f"{r['bits_per_byte']:.4f} bits/byte | {r['tokens']:,} tokens, {documents}"
        )
        if r.get("trained_on"):
            print(
                f"  warning: {r['trained_on']:,} of these {r['documents']:,} documents were in "
                "the run's training split (a file of its corpus, hashed to train): this measures "
                "recall of training text, not held-out text."
            )
        elif "trained_on" in r:
            print("  (none of these documents was in the run's training split)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return 0


def evaluate(args: argparse.Namespace) -> dict:
    """Loads the model, checks every input, then scores each dataset; returns the results."""
    from jaxlm.errors import JaxlmError
    from jaxlm.evaluate import seen, text, trained

    entries = [p.strip() for p in args.data.split(",") if p.strip()]
    if not entries:
        raise JaxlmError("--data is empty; pass files, globs or directories of text.")
    for entry in entries:  # a missing or empty file fails now, before the model is read
        text.check_data(entry, args.text_field)
    for flag in ("seq_len", "stride", "batch_size"):
        if getattr(args, flag) < 0 or (flag == "batch_size" and args.batch_size < 1):
            raise JaxlmError(f"--{flag}={getattr(args, flag)} must be positive.")
    if args.hf_dir:
        model = trained.load_hf(os.path.expanduser(args.hf_dir), progress=True)
        source = {"hf_dir": os.path.abspath(os.path.expanduser(args.hf_dir))}
    else:
        model = trained.load_trained(os.path.expanduser(args.workdir), step=args.step)
        source = {"workdir": os.path.abspath(args.workdir), "step": model.step}
    corpora = [text.read_corpus(e, model.tokenizer, args.text_field) for e in entries]
    run_len = model.config.train.seq_len if model.config is not None else 0
    seq_len = args.seq_len or run_len or model.setup.model_cfg.max_seq_len
    stride = args.stride or seq_len
    out = {**source, "seq_len": seq_len, "stride": stride, "data": {}}
    totals = [0.0, 0, 0, 0]  # nll, tokens, bytes, documents
    for corpus in corpora:
        r = text.evaluate_corpus(
            model,
            corpus,
            seq_len=seq_len,
            stride=stride,
            batch_size=args.batch_size,
            progress=Bar(corpus.name),
        )
        if model.config is not None:  # a training run: say if it trained on this text
            r["trained_on"] = seen.documents_trained_on(model.config, corpus.name)[0]
        out["data"][corpus.name] = r
        keys = ("nll", "tokens", "bytes", "documents")
        totals = [t + r[k] for t, k in zip(totals, keys, strict=True)]
    if len(corpora) > 1:
        out["data"]["all"] = text.summary(*totals)
    return out


if __name__ == "__main__":
    with cli.ctrl_c_is_one_line():
        sys.exit(main())
