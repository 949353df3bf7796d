"""Convert Hugging Face Llama-family models to jaxlm checkpoints and back.

    # HF directory (config.json + *.safetensors) -> jaxlm checkpoint in a workdir
    python tools/convert_hf.py import --hf_dir=~/models/tinysolar --workdir=runs/tinysolar-import

    # jaxlm checkpoint (newest, or --step) -> HF directory for transformers
    python tools/convert_hf.py export --workdir=runs/tinysolar-domain --out_dir=~/models/out \\
        [--step=N] [--dtype=bfloat16] [--tokenizer=PATH] [--max_shard_gb=2]

Both stream tensor by tensor (about one copy of the model in host memory) and show progress.
Needs `pip install 'jaxlm[hf]'` (safetensors, tokenizers). See jaxlm/convert/hf.py.
"""

from __future__ import annotations

import os

from absl import flags

from jaxlm import cli
from jaxlm.errors import JaxlmError

FLAGS = flags.FlagValues()  # this command's own: tests call it beside others (cli.call)
_HF_DIR = flags.DEFINE_string(
    "hf_dir", None, "import: directory with config.json + *.safetensors.", flag_values=FLAGS
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "import: the jaxlm workdir to write (must be empty); export: a workdir, its checkpoints/ "
    "or a step folder.",
    flag_values=FLAGS,
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "export: the HF model directory to write.", flag_values=FLAGS
)
_STEP = flags.DEFINE_integer(
    "step", None, "export: checkpoint step (default: newest).", flag_values=FLAGS
)
_DTYPE = flags.DEFINE_string(
    "dtype", "float32", "export: float32 (exact) | bfloat16 | float16.", flag_values=FLAGS
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "export: tokenizer file or dir (default: found).", flag_values=FLAGS
)
_MAX_SHARD_GB = flags.DEFINE_float(
    "max_shard_gb", 2.0, "export: the largest safetensors file, in GB.", flag_values=FLAGS
)
_NEEDS = {"import": ("hf_dir", "workdir"), "export": ("workdir", "out_dir")}


def main(argv: list[str]) -> int:
    """`import` or `export` (the positional subcommand), with its flags."""
    command, extra = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    if command not in _NEEDS:
        raise JaxlmError(
            "say what to do: `convert_hf.py import --hf_dir=... --workdir=...` or "
            "`convert_hf.py export --workdir=... --out_dir=...`."
        )
    if extra:
        raise JaxlmError(f"unexpected arguments after {command}: {' '.join(extra)}.")
    missing = [f"--{name}" for name in _NEEDS[command] if not FLAGS[name].value]
    if missing:
        raise JaxlmError(f"{command} needs {' and '.join(missing)}.")
    from jaxlm.convert import hf  # after parsing: --help stays fast

    workdir = os.path.expanduser(_WORKDIR.value)
    if command == "import":
        cfg = hf.import_hf(os.path.expanduser(_HF_DIR.value), workdir)
        n = sum(t.size for t in hf.layout(cfg))
        print(
            f"imported {n / 1e6:.1f}M parameters ({cfg.n_layers} layers, d_model "
            f"{cfg.d_model}, vocab {cfg.vocab_size}) into {_WORKDIR.value}/checkpoints/0\n"
            f"model config: {_WORKDIR.value}/model_config.json; continue training with "
            f"--config=configs/continue_pretraining.py:ckpt:{_WORKDIR.value}"
        )
    else:
        out = hf.export_hf(
            workdir,
            os.path.expanduser(_OUT_DIR.value),
            step=_STEP.value,
            dtype=_DTYPE.value,
            tokenizer=os.path.expanduser(_TOKENIZER.value),
            max_shard_bytes=int(_MAX_SHARD_GB.value * 1e9),
        )
        load = f"transformers.AutoModelForCausalLM.from_pretrained({out!r})"
        print(f"exported to {out}; load with {load}")
    return 0


if __name__ == "__main__":
    cli.run_cli(main, FLAGS, require_config=False)
