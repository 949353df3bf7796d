"""Continue a prompt with a trained run's model.

    python tools/generate.py --workdir=runs/tiny --prompt='def fibonacci(n):\\n' \\
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

    python tools/generate.py --workdir=runs/fim --fill_middle \\
        --prompt='def add(a, b):\\n    ' --suffix='\\n    return c\\n'
    python tools/generate.py --workdir=runs/tiny_encoder --fill_mask \\
        --prompt='for i in [MASK](len(items)):'

--fill_middle writes the middle between --prompt and --suffix (a FIM-trained model);
--fill_mask fills each [MASK] of --prompt and lists each one's five likeliest pieces.
"""

from __future__ import annotations

from absl import flags

from jaxlm import cli, storage
from jaxlm.errors import JaxlmError

FLAGS = flags.FlagValues()  # this command's own: tests call it beside others (cli.call)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's --workdir.", flag_values=FLAGS)
_PROMPT = flags.DEFINE_string(
    "prompt", "", "Text to continue ('' = start a new document).", flag_values=FLAGS
)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "New tokens to sample.", flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 = greedy.", flag_values=FLAGS)
_TOP_K = flags.DEFINE_integer(
    "top_k", None, "Keep the k most likely tokens; 0 = all.", flag_values=FLAGS
)
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus mass; 1 = off.", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)
_STEP = flags.DEFINE_integer(
    "step", None, "Checkpoint step (default: the newest).", flag_values=FLAGS
)
_FILL_MIDDLE = flags.DEFINE_bool(
    "fill_middle", False, "Write the middle between --prompt and --suffix.", flag_values=FLAGS
)
_SUFFIX = flags.DEFINE_string(
    "suffix", "", "--fill_middle: the text after the middle.", flag_values=FLAGS
)
_FILL_MASK = flags.DEFINE_bool(
    "fill_mask", False, "Fill the [MASK] pieces of --prompt.", flag_values=FLAGS
)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


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


def main(argv: list[str]) -> int:
    """Prints the prompt and its continuation (or the middle, or the filled masks)."""
    del argv
    from jaxlm.evaluate import trained as trained_lib

    prompt = _PROMPT.value.replace("\\n", "\n").replace("\\t", "\t")
    if _MAX_TOKENS.value is not None and _MAX_TOKENS.value < 1:
        raise JaxlmError(f"--max_tokens must be at least 1, not {_MAX_TOKENS.value}.")
    if _FILL_MIDDLE.value and _FILL_MASK.value:
        raise JaxlmError("--fill_middle and --fill_mask are two different looks; pick one.")
    mirror = storage.WorkdirMirror(_WORKDIR.value, "reads")  # a bucket workdir: its local copy
    mirror.pull()
    trained = trained_lib.load_trained(mirror.local, step=_STEP.value)
    sample = (trained.config or {}).get("sample") or {}  # an import has no run config
    pick = lambda flag, key, default: flag if flag is not None else sample.get(key, default)  # noqa: E731
    sampling = dict(
        temperature=pick(_TEMPERATURE.value, "temperature", 0.0),
        top_k=pick(_TOP_K.value, "top_k", 0),
        top_p=pick(_TOP_P.value, "top_p", 1.0),
        seed=_SEED.value,
    )
    max_tokens = pick(_MAX_TOKENS.value, "max_tokens", 0) or 64  # the run may disable samples
    if _FILL_MASK.value:
        return _print_fill_mask(trained, prompt)
    if _FILL_MIDDLE.value:
        from jaxlm import infill

        suffix = _SUFFIX.value.replace("\\n", "\n").replace("\\t", "\t")
        middle = infill.fill_middle(trained, prompt, suffix, max_tokens, **sampling)
        print(f"{prompt}{middle}{suffix}\nmiddle: {middle!r}", flush=True)
        return 0
    text = continue_prompt(trained, prompt, max_tokens=max_tokens, **sampling)
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
    cli.run_cli(main, FLAGS, require_config=False)
