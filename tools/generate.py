"""Continue a prompt with a trained run's model.

    python tools/generate.py --workdir=runs/tiny --prompt='def fibonacci(n):\n' \
        [--max_tokens=128 --temperature=0.8 --top_k=50 --top_p=0.95 --seed=0 --step=600]

Loads the newest (or `--step`) checkpoint's parameters from the workdir (config from the
checkpoint's metadata, tokenizer from `<workdir>/tokenizer.model` or `.json`) and prints the
prompt followed by its continuation. A workdir made by `tools/convert_hf.py import` works too
(model config and tokenizer/ from the import). The prompt starts with BOS only where the
tokenizer's own library adds one, so greedy text equals transformers' for the same weights.
Sampling flags left out take the run's `config.sample` values. `\\n` and `\\t`
in --prompt (and --suffix) are read as newline and tab, since shells make real newlines awkward
to type.

Non-causal runs (config.objective, see jaxlm/objectives.py):

    python tools/generate.py --workdir=runs/fim --fill_middle \
        --prompt='def add(a, b):\n    ' --suffix='\n    return c\n'
    python tools/generate.py --workdir=runs/tiny_encoder --fill_mask \
        --prompt='for i in [MASK](len(items)):'

--fill_middle writes the middle between --prompt and --suffix (a FIM-trained model);
--fill_mask fills each [MASK] of --prompt and lists each one's five likeliest pieces.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxlm import cli
from jaxlm.errors import JaxlmError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the training run's --workdir")
    p.add_argument("--prompt", default="", help="text to continue ('' = start a new document)")
    p.add_argument("--max_tokens", type=int, default=None, help="new tokens to sample")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens; 0 = all")
    p.add_argument("--top_p", type=float, default=None, help="nucleus mass; 1 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument(
        "--fill_middle", action="store_true", help="write the middle between --prompt and --suffix"
    )
    p.add_argument("--suffix", default="", help="--fill_middle: the text after the middle")
    p.add_argument("--fill_mask", action="store_true", help="fill the [MASK] pieces of --prompt")
    return p.parse_args(argv)


def continue_prompt(
    trained,
    prompt: str,
    *,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
) -> str:
    """The model's continuation of `prompt` (text), stopping at EOS or after `max_tokens`."""
    from jaxlm import generate
    from jaxlm.data.tokenizer import prompt_ids

    tok = trained.tokenizer
    # BOS first exactly where the tokenizer's own library puts one, so the continuation equals
    # transformers' for the same weights.
    ids = prompt_ids(tok, prompt)
    if not ids:
        raise JaxlmError("this tokenizer adds no BOS token, so --prompt must not be empty.")
    limit = trained.setup.model_cfg.max_seq_len
    if len(ids) + max_tokens > limit:
        raise JaxlmError(
            f"the prompt ({len(ids)} tokens with BOS) plus --max_tokens={max_tokens} exceeds the "
            f"model's max_seq_len={limit}; shorten the prompt or lower --max_tokens."
        )
    return generate.continue_text(
        trained, ids, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    try:
        from jaxlm.evaluate import trained as trained_lib

        if args.max_tokens is not None and args.max_tokens < 1:
            raise JaxlmError(f"--max_tokens must be at least 1, not {args.max_tokens}.")
        if args.fill_middle and args.fill_mask:
            raise JaxlmError("--fill_middle and --fill_mask are two different looks; pick one.")
        trained = trained_lib.load_trained(args.workdir, step=args.step)
        sample = (trained.config or {}).get("sample") or {}  # an import has no run config
        pick = lambda flag, key, default: flag if flag is not None else sample.get(key, default)  # noqa: E731
        sampling = dict(
            temperature=pick(args.temperature, "temperature", 0.0),
            top_k=pick(args.top_k, "top_k", 0),
            top_p=pick(args.top_p, "top_p", 1.0),
            seed=args.seed,
        )
        max_tokens = pick(args.max_tokens, "max_tokens", 0) or 64  # the run may disable samples
        if args.fill_mask:
            return _print_fill_mask(trained, prompt)
        if args.fill_middle:
            from jaxlm import infill

            suffix = args.suffix.replace("\\n", "\n").replace("\\t", "\t")
            middle = infill.fill_middle(trained, prompt, suffix, max_tokens, **sampling)
            print(f"{prompt}{middle}{suffix}\nmiddle: {middle!r}", flush=True)
            return 0
        text = continue_prompt(trained, prompt, max_tokens=max_tokens, **sampling)
    except JaxlmError as e:
        if os.environ.get("JAXLM_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(prompt + text, flush=True)
    return 0


def _print_fill_mask(trained, prompt: str) -> int:
    from jaxlm import infill

    filled, choices = infill.fill_mask(trained, prompt)
    print(filled, flush=True)
    for i, top in enumerate(choices):
        print(f"[MASK] {i + 1}: " + ", ".join(f"{piece!r} {p:.1%}" for piece, p in top))
    return 0


if __name__ == "__main__":
    with cli.ctrl_c_is_one_line():
        sys.exit(main())
