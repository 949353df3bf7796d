"""Compile a recipe's train step for a TPU slice or export it for CUDA, on this CPU.

    pip install 'jaxlm[tpu]'   # libtpu: the real TPU compiler, runs without a TPU
    python tools/compile.py --config=configs/llama_1b.py --target=v5p-8
    python tools/compile.py --config=configs/llama_8b.py --target=v5p-64
    python tools/compile.py --config=configs/llama_1b.py --target=h100-8   # CUDA export
    python tools/compile.py --config=configs/llama_8b.py --target=v5e-16 \\
        --config.train.grad_accum=16 --json=/tmp/llama_8b_v5e.json

Builds exactly the steps `python -m jaxlm.main` runs (same shardings, donation, gradient
accumulation, remat; `model.attention=auto` resolves for the target): one program per distinct
stage shape and RoPE of a staged run (a row each, and the largest decides whether the run
fits), and prints one table for the largest:
per-device memory from the TPU compiler against the chip's HBM and the planner's estimate,
compile time, FLOPs per step, and the compiler's *estimated* step time with the tokens/s and
MFU it implies (estimates, not measurements), and the time spent here: the main compile, the
costing compiles (for a scanned or accumulated step, two small unrolled ones) and the tool's
wall time. A step that does not fit is one `error:` sentence naming the overflow and the
cheapest remedy; `--json` then still writes the file, with `"fits": false` and the remedy
(its config overrides too), so a sweep keeps the rows that do not fit (any other error is
written as `"fits": null` and its sentence). Targets: v4-N, v5p-N (N TensorCores, two per
chip), v5e-N, v6e-N (N chips), and a100/h100/h200/b200-N (N GPUs) for CUDA export.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # the wall time the report gives counts from here

import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# Config files do `from configs import base`; make the repository root importable from anywhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_TARGET = flags.DEFINE_string("target", None, "v5p-64, v5e-16, v4-8, v6e-8, h100-8, ...")
_VOCAB = flags.DEFINE_integer("vocab_size", None, "Vocabulary (default tokenizer.vocab_size).")
_JSON = flags.DEFINE_string(
    "json", None, "Also write the report as JSON to this path (also when the step does not fit)."
)


def main(argv: list[str]) -> None:
    del argv
    import jax

    from jaxlm import aot, aot_report, hardware
    from jaxlm.errors import JaxlmError

    logging.set_verbosity(logging.WARNING)
    name = _CONFIG.value.get("name", "config")
    try:
        if not _TARGET.value:
            raise JaxlmError("--target is required, e.g. --target=v5p-8 or --target=h100-8.")
        target = hardware.parse_target(_TARGET.value)
        if target.platform != "tpu":  # a CUDA export lays the mesh over that many host devices
            jax.config.update("jax_num_cpu_devices", target.chips)
        print(f"compiling {name} for {target.name} ...", flush=True)
        reports = aot.compile_run(_CONFIG.value, target, _VOCAB.value)
    except JaxlmError as e:
        # A sweep keeps every row: a refusal with its remedy, any other error as its sentence.
        data = (
            e.as_dict()
            if isinstance(e, aot.DoesNotFit)
            else {"name": name, "target": _TARGET.value, "fits": None, "error": str(e)}
        )
        _write_json(dict(data, wall_seconds=time.perf_counter() - _STARTED))
        raise  # cli.run_cli prints it as one error line
    wall = time.perf_counter() - _STARTED
    reports = [dataclasses.replace(r, wall_seconds=wall) for r in reports]
    worst = max(reports, key=lambda r: r.total_memory)
    if len(reports) > 1:  # a staged run: every program it executes, then the largest in full
        print(aot_report.format_programs(reports))
    print(aot_report.format_report(worst))
    data = aot_report.report_dict(worst)
    if len(reports) > 1:
        data["programs"] = [aot_report.report_dict(r) for r in reports]
    _write_json(data)


def _write_json(data: dict) -> None:
    """Writes `data` to --json's path, if given."""
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


def run() -> None:
    from jaxlm.cli import run_cli

    run_cli(main)


if __name__ == "__main__":
    run()
