"""Loss, perplexity and bits per byte of a model on text files.

    # a training run's newest (or --step) checkpoint, or a tools/convert_hf.py import workdir
    python tools/evaluate.py --workdir=runs/tiny --data=/data/wikitext2_valid.txt
    # a Hugging Face directory of any family jaxlm imports (Llama, Qwen2/2.5, Qwen3, Mistral,
    # OLMo-2, Gemma-2, Gemma-3 text; docs/families.md), read directly (config.json,
    # *.safetensors, tokenizer)
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
against transformers within 0.1% for Llama, tests/test_families_e2e.py within 1e-4 for every
other family, sliding windows included).
"""

from __future__ import annotations

import json
import os

from absl import flags

from jaxlm import cli, storage
from jaxlm.errors import JaxlmError
from jaxlm.progress import Progress

FLAGS = flags.FlagValues()  # this command's own: tests call it beside others (cli.call)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A training run's or an import's --workdir.", flag_values=FLAGS
)
_HF_DIR = flags.DEFINE_string(
    "hf_dir", None, "A Hugging Face model directory (docs/families.md).", flag_values=FLAGS
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).", flag_values=FLAGS)
_DATA = flags.DEFINE_string(
    "data", None, "Comma-separated files, globs or directories.", flag_values=FLAGS
)
_TEXT_FIELD = flags.DEFINE_string(
    "text_field", "text", "JSONL key / Parquet column of the text.", flag_values=FLAGS
)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Window length; 0 = the model's.", flag_values=FLAGS)
_STRIDE = flags.DEFINE_integer(
    "stride", 0, "Window stride; 0 = seq_len (disjoint).", flag_values=FLAGS
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.", flag_values=FLAGS)
_JSON = flags.DEFINE_string(
    "json", "", "Also write the results to this JSON file.", flag_values=FLAGS
)
flags.mark_flag_as_required("data", flag_values=FLAGS)


def main(argv: list[str]) -> int:
    """Scores each --data entry (and all together) and prints one line each."""
    del argv
    if (_WORKDIR.value is None) == (_HF_DIR.value is None):
        raise JaxlmError("pass one model: --workdir (a run or an import) or --hf_dir.")
    results = evaluate(
        _DATA.value,
        workdir=_WORKDIR.value,
        hf_dir=_HF_DIR.value,
        step=_STEP.value,
        text_field=_TEXT_FIELD.value,
        seq_len=_SEQ_LEN.value,
        stride=_STRIDE.value,
        batch_size=_BATCH_SIZE.value,
    )
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
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return 0


def evaluate(
    data: str,
    *,
    workdir: str | None,
    hf_dir: str | None,
    step: int | None,
    text_field: str,
    seq_len: int,
    stride: int,
    batch_size: int,
) -> dict:
    """Loads the model (a workdir, or `hf_dir`), checks every input, then scores each dataset
    of `data` (comma-separated files, globs, directories); returns the results."""
    from jaxlm.evaluate import seen, text, trained

    entries = [p.strip() for p in data.split(",") if p.strip()]
    if not entries:
        raise JaxlmError("--data is empty; pass files, globs or directories of text.")
    for entry in entries:  # a missing or empty file fails now, before the model is read
        text.check_data(entry, text_field)
    for flag, value in (("seq_len", seq_len), ("stride", stride), ("batch_size", batch_size)):
        if value < 0 or (flag == "batch_size" and value < 1):
            raise JaxlmError(f"--{flag}={value} must be positive.")
    if hf_dir:
        model = trained.load_hf(os.path.expanduser(hf_dir), progress=True)
        source = {"hf_dir": os.path.abspath(os.path.expanduser(hf_dir))}
    else:
        # A bucket workdir: read through a local copy.
        mirror = storage.WorkdirMirror(os.path.expanduser(workdir), "reads")
        mirror.pull()
        model = trained.load_trained(mirror.local, step=step)
        source = {"workdir": storage.absolute(workdir), "step": model.step}
    corpora = [text.read_corpus(e, model.tokenizer, text_field) for e in entries]
    run_len = model.config.train.seq_len if model.config is not None else 0
    seq_len = seq_len or run_len or model.setup.model_cfg.max_seq_len
    stride = stride or seq_len
    out = {**source, "seq_len": seq_len, "stride": stride, "data": {}}
    totals = [0.0, 0, 0, 0]  # nll, tokens, bytes, documents
    for corpus in corpora:
        bar = Progress(corpus.name, unit="rows")  # its total comes with the first call
        r = text.evaluate_corpus(
            model,
            corpus,
            seq_len=seq_len,
            stride=stride,
            batch_size=batch_size,
            progress=bar,
        )
        bar.finish()
        if model.config is not None:  # a training run: say if it trained on this text
            r["trained_on"] = seen.documents_trained_on(model.config, corpus.name)[0]
        out["data"][corpus.name] = r
        keys = ("nll", "tokens", "bytes", "documents")
        totals = [t + r[k] for t, k in zip(totals, keys, strict=True)]
    if len(corpora) > 1:
        out["data"]["all"] = text.summary(*totals)
    return out


if __name__ == "__main__":
    cli.run_cli(main, FLAGS, require_config=False)
