"""XLA's own per-device memory for a compiled train step: what the planner (`jaxlm.estimate`)
is checked against, on this machine's devices (`xla_memory`) or a TPU slice's (`jaxlm.aot`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from jaxlm import sharding
from jaxlm import spec as run_spec


def xla_memory(
    config: Any, vocab_size: int | None = None, devices: Sequence[jax.Device] | None = None
) -> dict[str, float]:
    """Per-device bytes XLA assigns to the compiled train step of `config` on `devices` (of the
    stage program that needs the most, as `estimate` plans it).

    Compiles (never runs) `train.Setup`'s steps on abstract inputs. On CPU it asks for XLA's
    memory-optimised scheduler: the default one orders work for concurrency and lets buffers
    pile up that a memory-aware GPU or TPU scheduler would free.

    Returns:
      `compiled_memory`'s bytes: arguments, outputs, aliased, temp and total.
    """
    from jaxlm import train  # pulls in the data pipeline: only needed when measuring

    devices = list(devices if devices is not None else jax.devices())
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    spec = run_spec.build(config)
    setup = train.Setup(spec, int(vocab_size or config.tokenizer.vocab_size), mesh)
    cpu = devices[0].platform == "cpu"
    options = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"} if cpu else None
    per_program = [
        compiled_memory(setup.lower_train_step(s).compile(compiler_options=options))
        for s in spec.plan.programs
    ]
    return max(per_program, key=lambda m: m["total"])


def compiled_memory(compiled: Any) -> dict[str, float]:
    """A compiled step's per-device buffer bytes: arguments, outputs, aliased, temp and total
    (= arguments + outputs - aliased, the donated state being updated in place, + temp)."""
    stats = compiled.memory_analysis()
    out = {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temp": stats.temp_size_in_bytes,
    }
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
    return {k: float(v) for k, v in out.items()}
