"""Run metrics: the devices' peak FLOP/s (for MFU), writers for stdout, metrics.jsonl,
TensorBoard and W&B, and the summary text of held-out results.

TensorBoard events are written with tensorboardX so the default install carries no TensorFlow
(`clu.metric_writers` would import it).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax

from jaxlm import hardware, objectives


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Vendor peak bf16 FLOP/s of `device` (from `hardware.CHIPS`), or None (e.g. CPU)."""
    chip = hardware.chip_of_device((device or jax.devices()[0]).device_kind)
    return chip.peak_flops if chip else None


class Writer:
    """Fans a dict of scalars out to stdout, metrics.jsonl, TensorBoard and (optionally) W&B.

    Only process 0 writes; other processes' calls are no-ops so multi-host logs are not doubled.
    """

    def __init__(self, workdir: str, logging_cfg: Any, config_dict: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self.tb = None
        self.wandb = None
        if not self.enabled:
            return
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if logging_cfg.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)
        if logging_cfg.wandb:
            self.wandb = _start_wandb(workdir, logging_cfg, config_dict)

    def write(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
        """Records scalars for `step` in every enabled sink (stdout is separate: see `print`)."""
        if not self.enabled:
            return
        named = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
        self.jsonl.write(json.dumps({"step": step, **named}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in named.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(named, step=step)

    def trim(self, step: int) -> None:
        """Drops metrics.jsonl lines past `step`, so a resumed run keeps one line per step."""
        if not self.enabled:
            return
        self.jsonl.close()
        path = os.path.join(self.workdir, "metrics.jsonl")
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(kept)
        self.jsonl = open(path, "a")

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(workdir: str, logging_cfg: Any, config_dict: dict | None):
    try:
        import wandb
    except ImportError:
        sys.exit("error: logging.wandb=True needs the W&B extra: pip install 'jaxlm[wandb]'.")
    return wandb.init(
        project=logging_cfg.wandb_project,
        dir=workdir,
        config=config_dict,
        mode=logging_cfg.wandb_mode,
        name=os.path.basename(os.path.normpath(workdir)),
    )


class Throughput:
    """Tokens/s and ETA between log steps, measured on the host's wall clock."""

    def __init__(self, start_step: int, total_steps: int, tokens_per_step: int):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.last_time = time.perf_counter()
        self.last_step = start_step

    def update(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = max(step - self.last_step, 1)
        step_time = (now - self.last_time) / steps
        self.last_time, self.last_step = now, step
        return {
            "step_time_s": step_time,
            "tokens_per_s": self.tokens_per_step / step_time,
            "eta_s": step_time * (self.total_steps - step),
        }


def device_memory_gb() -> float | None:
    """Bytes in use on device 0 in GB, where the backend reports it."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "bytes_in_use" not in stats:
        return None
    return stats["bytes_in_use"] / 1e9


def before_after(before: dict[str, float] | None, after: dict[str, float]) -> str:
    """'  held-out loss before -> after: a 3.2100 -> 2.9000 | ...' lines, one per held-out set
    (and 'all'), or the final losses alone when there was no evaluation before training."""
    names = sorted(k[: -len("/loss")] for k in after if k.endswith("/loss")) + ["all"]
    key = lambda name: "loss" if name == "all" else f"{name}/loss"  # noqa: E731
    if before is None:
        losses = " | ".join(f"{n} {after[key(n)]:.4f}" for n in names if key(n) in after)
        return f"  held-out loss: {losses}\n"
    pairs = " | ".join(
        f"{n} {before[key(n)]:.4f} -> {after[key(n)]:.4f}"
        for n in names
        if key(n) in after and key(n) in before
    )
    return f"  held-out loss before -> after: {pairs}\n"


def final_figures(result: dict[str, float]) -> str:
    """'2.117 bits/byte (loss 1.4674) | gzip -9 on the same text: 1.607 bits/byte | ...': the
    final held-out numbers of `result` (an evaluation, with `gzip_bits_per_byte` if known)."""
    gzip_bpb = result.get("gzip_bits_per_byte")
    gz = f" | gzip -9 on the same text: {gzip_bpb:.3f} bits/byte" if gzip_bpb else ""
    return (
        f"{result['bits_per_byte']:.3f} bits/byte (loss {result['loss']:.4f}){gz}"
        f"{objectives.summary(result)}{task_summary(result)}"
    )


def task_summary(result: dict[str, float]) -> str:
    """' | <task> acc 41.0%' for each evaluation task in `result`."""
    accuracies = {k[: -len("/accuracy")]: v for k, v in result.items() if k.endswith("/accuracy")}
    return "".join(f" | {name} acc {acc:.1%}" for name, acc in sorted(accuracies.items()))
