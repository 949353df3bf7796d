"""Plan a run before paying for it: parameters, FLOPs, memory per device, time, cost.

    python tools/estimate.py --config=configs/llama_8b.py --hardware=h100 --chips=64 \\
        --mfu=0.4 --price-per-chip-hour=2.5
    python tools/estimate.py --config=configs/tiny.py --config.model.remat=full --chips=1
    python tools/estimate.py --config=configs/llama_8b.py --hardware=custom \\
        --peak-tflops=1979 --hbm-gib=192 --chips=8

Prints an 80-column table (Model, Compute, Memory per device, Time & cost, Chinchilla,
Suggestions). Nothing is allocated: the model is traced with `jax.eval_shape`. `--measure`
also compiles the real train step on this machine's devices and prints XLA's own per-device
total beside the estimate for the same device count. The same numbers are a function call away
in a notebook: `jaxlm.estimate.estimate(config, ...)`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

# Config files do `from configs import base`; make the repository root importable from anywhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_HARDWARE = flags.DEFINE_string(
    "hardware", "h100", "Chip: tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e, a100, h100, h200, or custom."
)
_CHIPS = flags.DEFINE_integer("chips", None, "Chips in the run (default: the mesh's, else 8).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model-FLOPs utilisation to assume, in (0, 1].")
_PRICE = flags.DEFINE_float("price-per-chip-hour", None, "Dollars per chip-hour, for the cost.")
_TOKENS = flags.DEFINE_float("tokens", None, "Training tokens (default: steps x batch x seq).")
_PEAK = flags.DEFINE_float("peak-tflops", None, "Peak dense bf16 TFLOP/s per chip (override).")
_HBM = flags.DEFINE_float("hbm-gib", None, "Memory per chip in GiB (override).")
_MEASURE = flags.DEFINE_bool("measure", False, "Also compile the step here and print XLA's total.")


def main(argv: list[str]) -> None:
    del argv
    import dataclasses

    from jaxlm import estimate as est_lib
    from jaxlm.errors import JaxlmError

    config = _CONFIG.value
    if config is None:
        sys.exit("error: --config is required, e.g. --config=configs/tiny.py")
    try:
        hardware = _hardware(est_lib, dataclasses)
        est = est_lib.estimate(
            config,
            hardware,
            chips=_CHIPS.value,
            mfu=_MFU.value,
            price_per_chip_hour=_PRICE.value,
            tokens=_TOKENS.value,
        )
        print(est_lib.format_table(est))
        if _MEASURE.value:
            _measure(est_lib, config, hardware)
    except JaxlmError as e:
        if os.environ.get("JAXLM_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")


def _hardware(est_lib, dataclasses):
    """The preset, with --peak-tflops/--hbm-gib applied (both required for `custom`)."""
    from jaxlm.errors import ConfigError

    peak = None if _PEAK.value is None else _PEAK.value * 1e12
    hbm = None if _HBM.value is None else _HBM.value * est_lib.GiB
    if _HARDWARE.value.strip().lower() == "custom":
        if peak is None or hbm is None:
            raise ConfigError("--hardware=custom needs --peak-tflops and --hbm-gib.")
        return est_lib.Hardware("custom", peak, hbm, "gpu")
    hw = est_lib.get_hardware(_HARDWARE.value)
    changes = {k: v for k, v in (("peak_flops", peak), ("memory_bytes", hbm)) if v is not None}
    return dataclasses.replace(hw, **changes)


def _measure(est_lib, config, hardware) -> None:
    import jax

    n = jax.device_count()
    print(f"Measured   compiling the train step on {n} local {jax.devices()[0].platform} device(s)")
    xla = est_lib.xla_memory(config)
    ours = est_lib.estimate(config, hardware, chips=n, mfu=_MFU.value).memory.total
    print(
        f"  XLA total per device      {est_lib._bytes(xla['total']):>16}  "
        f"estimate for {n} chip(s): {est_lib._bytes(ours)}"
    )


def run() -> None:
    flags.mark_flag_as_required("config")
    try:
        app.run(main)
    except (AttributeError, KeyError) as e:  # raised by --config.x overrides naming unknown keys
        message = str(e.args[0] if e.args else e).replace("\n", " ")
        sys.exit(f"error: bad --config override: {message}")


if __name__ == "__main__":
    run()
