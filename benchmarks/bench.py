"""Training-step benchmark: tokens/s, step time, MFU, memory, time split, checkpoint stall.

    python benchmarks/bench.py --config=configs/tiny.py [--steps=20] [--checkpoint_every=10]
        [--local_every=2] [--stall_only]

Runs the real jitted train step of a config on synthetic packed batches (no data preparation),
so the number is the model's, not the loader's. The timed steps run in `--rounds` windows and
the step time is the median window. MFU is model FLOPs (6N + causal attention, see
`ModelConfig.flops_per_token`) per second over the devices' peak: the vendor bf16 peak on
GPU/TPU; on CPU the fp32 rate of large jitted matmuls timed before each step window, the
fastest window counting (so host slow-downs during the run lower the MFU, never raise it).
With `--checkpoint_every` (and `--local_every`, the local tier: jaxlm/tiers.py) it also times
what the loop waits for each save: orbax's async save blocks for its device-to-host copy (and
for the previous save, if that is still writing); the local tier's save blocks for all of it.
"""

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxlm import cli  # noqa: E402

if __name__ == "__main__":
    cli.restart_with_huge_pages()  # before jax is imported: the restart should be cheap

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import timing  # noqa: E402
from jaxlm import checkpoint, metrics, sharding, tiers, train  # noqa: E402
from jaxlm import spec as run_spec

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after compile and 2 warm-up steps).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timing windows the steps are split into.")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size; 0 = config.tokenizer.vocab_size.")
_CKPT = flags.DEFINE_integer("checkpoint_every", 0, "Also save async checkpoints every N steps.")
_LOCAL = flags.DEFINE_integer(
    "local_every", 0, "With --checkpoint_every: local-tier saves every N steps between them."
)
_SPLIT = flags.DEFINE_bool("split", True, "Also time forward and forward+backward alone.")
_STALL_ONLY = flags.DEFINE_bool(
    "stall_only", False, "Only the checkpoint stall (no step windows, no MFU): a quick mode."
)


class MatmulPeak:
    """The fp32 FLOP/s of large jitted matmuls on this host: the CPU's practical peak.

    Timed in windows between the train-step windows, and the fastest window is the peak, so a
    host that slows down under sustained work (a shared VM) cannot flatter the model. The loop
    runs inside one program so no window pays for allocating its output.
    """

    def __init__(self, n: int = 2048, repeats: int = 8):
        self.flops = 2 * n**3 * repeats
        self.a = jnp.full((n, n), 1.0 / n, jnp.float32)  # a @ a == a: values stay finite
        self.f = jax.jit(lambda a: jax.lax.fori_loop(0, repeats, lambda i, x: x @ a, a))
        self.f(self.a).block_until_ready()

    def measure(self) -> float:
        t0 = time.perf_counter()
        self.f(self.a).block_until_ready()
        return self.flops / (time.perf_counter() - t0)


def bench(
    config,
    steps: int,
    rounds: int,
    vocab: int,
    checkpoint_every: int,
    split: bool,
    local_every: int = 0,
) -> dict[str, float]:
    """Times `steps` train steps in `rounds` windows; returns the figures `main` prints."""
    mesh = sharding.make_mesh(config.mesh.shape)
    setup = train.Setup(run_spec.build(config), vocab, mesh)
    B, L = config.train.batch_size, config.train.seq_len
    host = timing.synthetic_batch(B, L, vocab)
    results = {"params_m": setup.n_params / 1e6, "devices": jax.device_count()}
    vendor_peak = metrics.peak_flops_per_device()
    cpu_peak = MatmulPeak() if vendor_peak is None else None
    flops = setup.model_cfg.flops_per_token(L) * B * L  # per step
    batch = sharding.host_to_global(host, mesh)
    state = setup.init_state()
    step = setup.jit_train_step()
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    results["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is not None:
        results["compiled_memory_gb"] = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes
        ) / 1e9
    for _ in range(2):
        state, m = step(state, batch)
    jax.block_until_ready(m)

    def run_steps(n: int):
        nonlocal state
        for _ in range(n):
            state, m = step(state, batch)
        return m

    peaks = []
    measure_peak = (lambda: peaks.append(cpu_peak.measure())) if cpu_peak else None
    per_round = max(1, steps // rounds)
    step_times = timing.windows(run_steps, rounds, per_round, between=measure_peak)
    if cpu_peak is not None:
        peaks.append(cpu_peak.measure())  # bracket the last step window too

    step_time = float(np.median(step_times))
    results["step_time_s"] = step_time
    results["step_time_min_s"] = min(step_times)
    results["tokens_per_s"] = B * L / step_time
    results["model_tflops_per_s"] = flops / step_time / 1e12
    if cpu_peak is None:
        peak = vendor_peak * jax.device_count()
        results["peak_source"] = f"{jax.devices()[0].device_kind} bf16 data sheet"
    else:
        peak = max(peaks) * jax.device_count()
        results["peak_source"] = f"fastest of {len(peaks)} fp32 matmul windows"
    results["mfu_pct"] = 100 * flops / step_time / peak
    results["peak_tflops_per_s"] = peak / 1e12

    if split:
        params = state["params"]
        forward = sharding.jit(lambda p, b: train.loss_sums(setup.graphdef, p, b), setup.mesh_rules)
        grad = sharding.jit(
            jax.grad(lambda p, b: train.loss_sums(setup.graphdef, p, b)[0]), setup.mesh_rules
        )
        results["forward_s"] = timing.seconds_per_call(forward, params, batch, calls=per_round)
        results["forward_backward_s"] = timing.seconds_per_call(
            grad, params, batch, calls=per_round
        )

    if checkpoint_every:  # last: the saves' steps donate `state`
        results.update(
            checkpoint_stall(config, step, state, batch, steps, checkpoint_every, local_every)
        )

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        results["peak_memory_gb"] = stats["peak_bytes_in_use"] / 1e9
    return results


def stall_only(config, steps: int, vocab: int, every: int, local_every: int) -> dict[str, float]:
    """`checkpoint_stall` alone, after compiling the step and two warm-up steps."""
    mesh = sharding.make_mesh(config.mesh.shape)
    setup = train.Setup(run_spec.build(config), vocab, mesh)
    host = timing.synthetic_batch(config.train.batch_size, config.train.seq_len, vocab)
    batch = sharding.host_to_global(host, mesh)
    state, step = setup.init_state(), setup.jit_train_step()
    for _ in range(2):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return checkpoint_stall(config, step, state, batch, steps, every, local_every)


def checkpoint_stall(
    config, step, state, batch, steps: int, every: int, local_every: int = 0
) -> dict[str, float]:
    """What the loop waits for saves over `steps` steps: persistent saves every `every` steps
    and, with `local_every`, local-tier saves every `local_every` steps.

    Returns `checkpoint_stall_pct` (the persistent saves' blocking parts over the time spent
    stepping), `checkpoint_stall_per_save_s` (their median), `checkpoint_final_wait_s` (a run's
    wait for its last save, once per run), and `local_stall_pct`, `local_stall_per_save_s`.
    """
    root = tempfile.mkdtemp(prefix="jaxlm-bench-")
    ckpt = checkpoint.Checkpointer(os.path.join(root, "checkpoints"), config.checkpoint)
    local = tiers.LocalTier(os.path.join(root, "local"), root) if local_every else None
    stalls: dict[str, list[float]] = {"checkpoint": [], "local": []}
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        state, m = step(state, batch)
        for tier, save, due in (
            ("checkpoint", ckpt.save, i % every == 0),
            ("local", local and local.save, local_every and i % local_every == 0),
        ):
            if due:  # as in the loop: both tiers at a step due for both
                jax.block_until_ready(state)  # the step itself is not the checkpoint's cost
                s0 = time.perf_counter()
                save(i, state, {"bench": i}, {})
                stalls[tier].append(time.perf_counter() - s0)
    jax.block_until_ready(m)
    stepping = time.perf_counter() - t0 - sum(stalls["checkpoint"]) - sum(stalls["local"])
    s0 = time.perf_counter()
    ckpt.wait()
    results = {"checkpoint_final_wait_s": time.perf_counter() - s0}
    ckpt.close()
    shutil.rmtree(root)
    for tier, times in stalls.items():
        if times:
            results[f"{tier}_stall_pct"] = 100 * sum(times) / stepping
            results[f"{tier}_stall_per_save_s"] = float(np.median(times))
    return results


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    vocab = _VOCAB.value or config.tokenizer.vocab_size
    if _STALL_ONLY.value:
        r = stall_only(config, _STEPS.value, vocab, _CKPT.value, _LOCAL.value)
        print(f"config {config.name}: {_STEPS.value} steps, {jax.device_count()} device(s)")
        print_stall(r)
        return
    r = bench(config, _STEPS.value, _ROUNDS.value, vocab, _CKPT.value, _SPLIT.value, _LOCAL.value)
    print(
        f"config {config.name}: {r['params_m']:.2f}M params, batch {config.train.batch_size} x "
        f"{config.train.seq_len}, {r['devices']} {jax.devices()[0].platform} device(s), "
        f"dtype {config.model.dtype}, remat {config.model.remat}"
    )
    print(f"compile            {r['compile_s']:8.2f} s")
    print(
        f"step time          {r['step_time_s'] * 1e3:8.1f} ms "
        f"(median of {_ROUNDS.value} rounds; fastest {r['step_time_min_s'] * 1e3:.1f} ms)"
    )
    print(f"throughput         {r['tokens_per_s']:8,.0f} tokens/s")
    print(
        f"model FLOP/s       {r['model_tflops_per_s'] * 1e3:8.1f} GFLOP/s "
        f"(peak {r['peak_tflops_per_s'] * 1e3:,.1f} GFLOP/s, {r['peak_source']})"
    )
    print(f"MFU                {r['mfu_pct']:8.1f} %")
    if "forward_s" in r:
        print(
            f"forward alone      {r['forward_s'] * 1e3:8.1f} ms; forward+backward alone "
            f"{r['forward_backward_s'] * 1e3:.1f} ms (separate programs, not a split of the step)"
        )
    if "compiled_memory_gb" in r:
        print(
            f"compiled memory    {r['compiled_memory_gb']:8.3f} GB per device (XLA memory_analysis)"
        )
    if "peak_memory_gb" in r:
        print(f"peak memory        {r['peak_memory_gb']:8.3f} GB (device 0)")
    print_stall(r)


def print_stall(r: dict[str, float]) -> None:
    """The checkpoint stall lines of `checkpoint_stall`'s figures (none without them)."""
    if "checkpoint_stall_pct" in r:
        print(
            f"checkpoint stall   {r['checkpoint_stall_pct']:8.2f} % of step time, "
            f"{r['checkpoint_stall_per_save_s'] * 1e3:.1f} ms per save (persistent tier, async, "
            f"every {_CKPT.value} steps; the run's final wait {r['checkpoint_final_wait_s']:.2f} s)"
        )
    if "local_stall_pct" in r:
        print(
            f"local-tier stall   {r['local_stall_pct']:8.2f} % of step time, "
            f"{r['local_stall_per_save_s'] * 1e3:.1f} ms per save (synchronous, every "
            f"{_LOCAL.value} steps)"
        )


if __name__ == "__main__":
    cli.run_cli(main)
