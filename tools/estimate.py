"""Plan a run before paying for it: parameters, FLOPs, memory per device, time, cost.

    python tools/estimate.py --config=configs/llama_8b.py --hardware=h100 --chips=64 \\
        --mfu=0.4 --price-per-chip-hour=2.5
    python tools/estimate.py --config=configs/tiny.py --config.model.remat=full --chips=1
    python tools/estimate.py --config=configs/llama_8b.py --hardware=custom \\
        --peak-tflops=1979 --hbm-gib=192 --chips=8
    python tools/estimate.py --config=configs/llama_8b.py --target=v5p-64   # as tools/compile.py

Prints an 80-column table: Model, Compute, Memory per device, Time & cost, Chinchilla and
Suggestions. Bad input (an unknown chip, an MFU outside (0, 1], no chips) is one `error:` line.
Nothing is allocated: the model is traced with `jax.eval_shape`. `--measure` also compiles the
real train step for this machine's devices and prints XLA's per-device total beside the
estimate. In a notebook the same numbers are `jaxlm.estimate.estimate(config, ...)`.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import flags, logging
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
_PLATFORM = flags.DEFINE_enum("platform", "gpu", ["gpu", "tpu"], "Platform of --hardware=custom.")
_MEASURE = flags.DEFINE_bool("measure", False, "Also compile the step here; print XLA's total.")
_TARGET = flags.DEFINE_string(
    "target",
    None,
    "A slice as tools/compile.py names it (v5p-64, v5e-16, h100-8): sets the "
    "hardware and the chip count.",
)


def main(argv: list[str]) -> None:
    del argv
    from jaxlm import estimate, estimate_table

    logging.set_verbosity(logging.WARNING)  # jax logs each accelerator backend it cannot open
    config = _CONFIG.value
    hardware, chips = _hardware(), _CHIPS.value
    if _TARGET.value:
        from jaxlm import hardware as hardware_lib

        target = hardware_lib.parse_target(_TARGET.value)
        hardware, chips = target.chip, target.chips
    est = estimate.estimate(
        config,
        hardware,
        chips=chips,
        mfu=_MFU.value,
        price_per_chip_hour=_PRICE.value,
        tokens=_TOKENS.value,
    )
    print(estimate_table.format_table(est))
    if _MEASURE.value:
        _measure(config, hardware)


def _hardware():
    """The preset with --peak-tflops/--hbm-gib applied (`custom` needs both)."""
    from jaxlm import estimate
    from jaxlm.errors import ConfigError

    peak = None if _PEAK.value is None else _PEAK.value * 1e12
    hbm = None if _HBM.value is None else _HBM.value * estimate.GiB
    if _HARDWARE.value.strip().lower() == "custom":
        if peak is None or hbm is None:
            raise ConfigError("--hardware=custom needs --peak-tflops and --hbm-gib.")
        return estimate.Hardware("custom", peak, hbm, _PLATFORM.value)
    changes = {k: v for k, v in (("peak_flops", peak), ("memory_bytes", hbm)) if v is not None}
    return dataclasses.replace(estimate.get_hardware(_HARDWARE.value), **changes)


def _measure(config, hardware) -> None:
    """XLA's per-device total for this machine's devices, beside the estimate for them."""
    import jax

    from jaxlm import estimate, estimate_xla

    n, platform = jax.device_count(), jax.devices()[0].platform
    print(f"Measured   the train step compiled for {n} local {platform} device(s)")
    xla = estimate_xla.xla_memory(config)["total"]
    local = dataclasses.replace(hardware, platform=platform)  # resolve attention="auto" as here
    ours = estimate.estimate(config, local, chips=n, mfu=_MFU.value).memory.total
    xla, ours = estimate.format_bytes(xla), estimate.format_bytes(ours)
    print(f"  XLA total per device {xla:>19}  estimate: {ours}")


def run() -> None:
    from jaxlm.cli import run_cli

    run_cli(main)


if __name__ == "__main__":
    run()
