"""Accelerators in one place: each chip's bf16 peak and memory, and compile targets.

`CHIPS` is the one table of chip figures: the trainer's MFU (`metrics`), the planner
(`estimate`) and the ahead-of-time compiler (`jaxlm.aot`) all read it. A *target* names a
slice of chips the way cloud consoles do: `v5p-64`, `v5e-16`, `v4-8`, `v6e-8` for TPUs (for v4
and v5p the number counts TensorCores, two per chip, so v5p-64 is 32 chips; for v5e and v6e it
counts chips), and `h100-8`, `h200-1`, `a100-8`, `b200-8` for GPUs.

`target_devices(target)` returns the devices of a TPU slice without owning one: libtpu's
compile-only topology (`pip install "jaxlm[tpu]"`). libtpu prints warnings about cloud
metadata when it loads; they are kept off the console. `keep_off_absent_tpu()` stops a CPU or
GPU machine that merely has libtpu installed from probing (and warning about) a TPU backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import tempfile
from collections.abc import Iterator

from jaxlm.errors import ConfigError

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: dense bf16 peak FLOP/s and memory (HBM) per chip."""

    name: str
    peak_flops: float  # FLOP/s, dense bf16, no sparsity
    memory_bytes: float  # HBM per chip
    platform: str = "gpu"  # tpu | gpu | cpu: decides what attention="auto" becomes
    device_kind: str = ""  # what jax's `device.device_kind` says for it (lowercase substring)
    cores_per_chip: int = 1  # TensorCores a TPU target name counts per chip (v4, v5p: 2)
    topology_dims: int = 0  # TPU torus dimensions (2 for v5e/v6e, 3 for v4/v5p); 0 = GPU


# Vendors' dense bf16 peaks and HBM per chip.
CHIPS: dict[str, Chip] = {
    "tpu-v4": Chip("TPU v4", 275e12, 32 * GiB, "tpu", "tpu v4", 2, 3),
    "tpu-v5e": Chip("TPU v5e", 197e12, 16 * GiB, "tpu", "tpu v5 lite", 1, 2),
    "tpu-v5p": Chip("TPU v5p", 459e12, 95 * GiB, "tpu", "tpu v5", 2, 3),
    "tpu-v6e": Chip("TPU v6e", 918e12, 32 * GiB, "tpu", "tpu v6 lite", 1, 2),
    "a100": Chip("A100 80GB", 312e12, 80 * GiB, "gpu", "a100"),
    "h100": Chip("H100", 989e12, 80 * GiB, "gpu", "h100"),
    "h200": Chip("H200", 989e12, 141 * GiB, "gpu", "h200"),
    "b200": Chip("B200", 2250e12, 192 * GiB, "gpu", "b200"),
}


def get_chip(name: str) -> Chip:
    """The chip called `name` ("h100", "tpu-v5p", "v5p" and "TPU v5p" all work)."""
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    key = f"tpu-{key}" if f"tpu-{key}" in CHIPS else key
    if key not in CHIPS:
        raise ConfigError(
            f"unknown hardware {name!r}; choose one of {', '.join(CHIPS)}, or give peak "
            "FLOP/s and memory per chip yourself (Hardware(...), or --hardware=custom "
            "--peak-tflops=... --hbm-gib=...)."
        )
    return CHIPS[key]


def chip_of_device(device_kind: str) -> Chip | None:
    """The chip whose `device_kind` a jax device reports, or None (e.g. CPU)."""
    kind = device_kind.lower()
    # Longest names first: "tpu v5 lite" must win over "tpu v5".
    for chip in sorted(CHIPS.values(), key=lambda c: -len(c.device_kind)):
        if chip.device_kind and chip.device_kind in kind:
            return chip
    return None


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice to compile for: `chips` chips of one kind."""

    name: str  # as given, e.g. "v5p-64"
    chip: Chip
    chips: int

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def topology(self) -> str:
        """libtpu's topology name, e.g. "v5p:2x4x4" (TPUs only)."""
        generation = self.chip.name.split()[-1].lower()  # v4, v5e, v5p, v6e
        return f"{generation}:{'x'.join(map(str, torus_shape(self.chips, self.chip)))}"


def parse_target(name: str) -> Target:
    """`v5p-64`, `v5e-16`, `v4-8`, `v6e-8`, `h100-8`, `h200` (one chip) -> a Target."""
    match = re.fullmatch(r"(?:tpu-?)?([a-z0-9]+?)(?:-(\d+))?", str(name).strip().lower())
    if not match:
        raise ConfigError(f"--target={name!r} is not of the form v5p-64, v5e-16 or h100-8.")
    kind, count = match.group(1), int(match.group(2) or 0)
    known = [k.removeprefix("tpu-") for k in CHIPS]
    if kind not in known:
        raise ConfigError(
            f"--target={name!r}: unknown chip {kind!r}; targets look like "
            f"{', '.join(k + '-8' for k in known)}."
        )
    chip = get_chip(kind)
    if chip.platform == "tpu":
        if count == 0 or count % chip.cores_per_chip:
            raise ConfigError(
                f"--target={name!r} needs a size: {kind}-N counts "
                f"{'TensorCores, two per chip' if chip.cores_per_chip == 2 else 'chips'} "
                f"(e.g. {kind}-{8 * chip.cores_per_chip // 2})."
            )
        chips = count // chip.cores_per_chip
        torus_shape(chips, chip)  # refuse sizes no slice has, before any compile
    else:
        chips = count or 1
    return Target(name, chip, chips)


def torus_shape(chips: int, chip: Chip) -> tuple[int, ...]:
    """The slice shape of `chips` TPU chips: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4 ... (3-D) or
    1x1, 2x2, 2x4, 4x4, 4x8 ... (2-D), the shapes cloud TPU slices come in."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"TPU slices have a power-of-two number of chips, not {chips}.")
    if chip.topology_dims == 2:
        side = 2 ** (int(math.log2(chips)) // 2)
        return (side, chips // side)
    if chips <= 4:
        return {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1)}[chips]
    dims = [2, 2, 1]
    while math.prod(dims) < chips:  # double the shortest side: slices stay near-cubic
        dims[dims.index(min(dims))] *= 2
        dims.sort()
    return tuple(dims)


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Sends file descriptor 2 to a temporary file (libtpu writes there from C++); the caller
    gets its text afterwards, to show if the call failed."""
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode(errors="replace"))


def target_devices(target: Target) -> list:
    """The compile-only devices of a TPU slice (needs libtpu), or this host's devices for a
    GPU target (a CUDA export needs no GPU, only the device count)."""
    import jax

    if target.platform != "tpu":
        return list(jax.devices())
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(
            f"compiling for {target.name} needs libtpu: pip install 'jaxlm[tpu]' "
            "(the TPU compiler runs on this CPU; no TPU is needed)."
        )
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock meant for processes that drive real chips; compile-only
    # devices drive none, so several compiles (or a test and a tool) may load it side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {}
    if target.chip.name == "TPU v4":
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as on real v4 hosts
    if target.chips < 4:  # smaller than one host: the host is the slice
        dims = torus_shape(target.chips, target.chip)
        kwargs["chips_per_host_bounds"] = dims + (1,) * (3 - len(dims))
    try:
        with _stderr_captured() as log:
            topology = topologies.get_topology_desc(
                platform="tpu", topology_name=target.topology, **kwargs
            )
    except Exception as e:  # libtpu's errors are long C++ dumps: keep their first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        detail = log[0].strip().splitlines()[-1:] if log and log[0].strip() else []
        raise ConfigError(
            f"libtpu could not describe {target.name} ({target.topology}): {first}"
            + (f" [{detail[0][:200]}]" if detail else "")
        ) from None
    return list(topology.devices)


def keep_off_absent_tpu() -> None:
    """On a machine with libtpu installed but no TPU, leaves the TPU backend unprobed.

    Otherwise jax loads libtpu at start-up, which prints cloud-metadata warnings and fails
    before jax falls back to the CPU. Does nothing if JAX_PLATFORMS (or jax_platforms) is set,
    if libtpu is absent, or if TPU chips are present.
    """
    import jax

    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return
    if importlib.util.find_spec("libtpu") is None:
        return
    from jax._src import hardware_utils, xla_bridge

    if xla_bridge.backends_are_initialized():
        return
    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        return
    cuda_plugin = any(
        importlib.util.find_spec(p) is not None for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")
    )
    cuda = cuda_plugin and hardware_utils.has_visible_nvidia_gpu()
    jax.config.update("jax_platforms", "cuda,cpu" if cuda else "cpu")
