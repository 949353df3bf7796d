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

import argparse
import os
import sys

from jaxlm import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF model directory -> jaxlm workdir")
    imp.add_argument("--hf_dir", required=True, help="directory with config.json + *.safetensors")
    imp.add_argument("--workdir", required=True, help="jaxlm workdir to write (must be empty)")
    exp = sub.add_parser("export", help="jaxlm checkpoint -> HF model directory")
    exp.add_argument("--workdir", required=True, help="workdir, its checkpoints/ or a step folder")
    exp.add_argument("--out_dir", required=True, help="HF model directory to write")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    exp.add_argument("--dtype", default="float32", help="float32 (exact) | bfloat16 | float16")
    exp.add_argument("--tokenizer", default="", help="tokenizer file or dir (default: found)")
    exp.add_argument("--max_shard_gb", type=float, default=2.0, help="largest safetensors file")
    args = parser.parse_args(argv)

    from jaxlm.convert import hf  # after parsing: --help stays fast
    from jaxlm.errors import JaxlmError

    try:
        if args.command == "import":
            cfg = hf.import_hf(os.path.expanduser(args.hf_dir), os.path.expanduser(args.workdir))
            n = sum(t.size for t in hf.layout(cfg))
            print(
                f"imported {n / 1e6:.1f}M parameters ({cfg.n_layers} layers, d_model "
                f"{cfg.d_model}, vocab {cfg.vocab_size}) into {args.workdir}/checkpoints/0\n"
                f"model config: {args.workdir}/model_config.json; continue training with "
                f"--config=configs/continue_pretraining.py:ckpt:{args.workdir}"
            )
        else:
            out = hf.export_hf(
                os.path.expanduser(args.workdir),
                os.path.expanduser(args.out_dir),
                step=args.step,
                dtype=args.dtype,
                tokenizer=os.path.expanduser(args.tokenizer),
                max_shard_bytes=int(args.max_shard_gb * 1e9),
            )
            print(
                f"exported to {out}; load with "
                f"transformers.AutoModelForCausalLM.from_pretrained({out!r})"
            )
    except JaxlmError as e:
        if os.environ.get("JAXLM_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with cli.ctrl_c_is_one_line():
        sys.exit(main())
