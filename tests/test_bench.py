"""benchmarks/bench.py: its peak really is matmul work, its timers read known durations, and its
figures agree with FLOP and parameter counts read from the model itself."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bench, timing
from tests.helpers import VOCAB, tiny_config


def test_matmul_peak_computes_the_product_it_times():
    peak = bench.MatmulPeak(n=64, repeats=3)
    a = np.asarray(peak.a)
    np.testing.assert_allclose(np.asarray(peak.f(peak.a)), a @ a @ a @ a, rtol=1e-5)
    assert peak.flops == 2 * 64**3 * 3  # three n x n x n matmuls, a multiply and an add each


def test_matmul_peak_divides_its_flops_by_the_time_taken():
    peak = bench.MatmulPeak(n=64, repeats=3)
    peak.f = lambda a: (time.sleep(0.05), a)[1]  # a "matmul" known to take 50 ms
    rate = peak.measure()
    assert peak.flops / 0.08 < rate <= peak.flops / 0.05  # sleep overshoots, never undershoots


def test_seconds_per_call_reads_a_known_duration():
    calls = []

    def sleep_20ms(x):
        calls.append(x)
        time.sleep(0.02)
        return jnp.zeros(())

    seconds = timing.seconds_per_call(sleep_20ms, 7, calls=5)
    assert len(calls) == 6  # one warm-up call, not timed
    assert 0.02 <= seconds < 0.035


def test_windows_time_each_window_per_unit_and_leave_between_untimed():
    between_calls = []

    def run(n):  # n units of 10 ms
        time.sleep(0.01 * n)

    def between():  # 50 ms that must not count
        between_calls.append(1)
        time.sleep(0.05)

    seconds = timing.windows(run, rounds=3, per_round=2, between=between)
    assert len(between_calls) == 3 and len(seconds) == 3
    assert all(0.01 <= s < 0.02 for s in seconds)


def test_best_of_is_the_fastest_timed_call_after_the_warm_up():
    durations = iter([0.08, 0.04, 0.01, 0.03])  # the warm-up (untimed), then three repeats
    seconds, result = timing.best_of(lambda: time.sleep(next(durations)) or "done", repeats=3)
    assert 0.01 <= seconds < 0.03 and result == "done"


def test_checkpoint_stall_is_the_time_saving_over_the_time_stepping(monkeypatch):
    clock = [0.0]  # a fake clock: steps take 10 ms, saves 40 ms, the final wait 40 ms more
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def advance(seconds):
        return lambda *args, **kwargs: clock.__setitem__(0, clock[0] + seconds)

    class SlowCheckpointer:
        def __init__(self, directory, ckpt_cfg):
            pass

        save, wait, close = advance(0.04), advance(0.04), advance(0.0)

    monkeypatch.setattr(bench.checkpoint, "Checkpointer", SlowCheckpointer)

    def step(state, batch):
        advance(0.01)()
        return state, jnp.zeros(())

    r = bench.checkpoint_stall(tiny_config(), step, jnp.zeros(()), None, steps=8, every=4)
    # 8 steps x 10 ms = 80 ms of stepping; 2 saves x 40 ms stalled; the final wait apart.
    assert r["checkpoint_stall_pct"] == pytest.approx(100 * 80 / 80)
    assert r["checkpoint_stall_per_save_s"] == pytest.approx(0.04)
    assert r["checkpoint_final_wait_s"] == pytest.approx(0.04)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU peak path")
def test_bench_figures_match_counts_read_from_the_model(tmp_path):
    config = tiny_config()
    config.checkpoint.keep = 2
    r = bench.bench(
        config, steps=4, rounds=2, vocab=VOCAB, checkpoint_every=4, split=False, local_every=2
    )
    B, L = config.train.batch_size, config.train.seq_len
    # Expected figures read from the model, not re-typed from model.py's formula: parameters
    # from its state; matmul FLOPs from the dot products of its traced forward pass at L and 2L,
    # which split the weight matmuls (linear in L) from attention's (quadratic in L).
    from jaxlm import model as model_lib
    from tests.helpers import forward_matmul_flops, param_sizes

    cfg = model_lib.ModelConfig.from_config(config.model, VOCAB)
    sizes = param_sizes(cfg)
    assert r["params_m"] * 1e6 == pytest.approx(sum(sizes.values()), abs=0.5)
    one, two = forward_matmul_flops(cfg, L), forward_matmul_flops(cfg, 2 * L)
    attention = (two - 2 * one) // 2  # one = a L + b L^2, two = 2 a L + 4 b L^2
    weights = one - attention
    norms = sum(n for path, n in sizes.items() if "norm" in path)
    assert attention > 0 and weights == 2 * L * (sum(sizes.values()) - sizes["embed"] - norms)
    # The convention MFU is quoted in: training is 3x the forward pass, causal masking halves
    # attention's useful work, and 6N counts the norm scales too (not matmuls, a rounding error).
    flops_per_step = B * (3 * (weights + attention / 2) + 6 * norms * L)
    assert r["model_tflops_per_s"] * 1e12 * r["step_time_s"] == pytest.approx(flops_per_step)
    mfu = 100 * flops_per_step / r["step_time_s"] / (r["peak_tflops_per_s"] * 1e12)
    assert r["mfu_pct"] == pytest.approx(mfu)
    assert 0 < r["mfu_pct"] < 100  # a model cannot beat the matmul peak it is measured against
    # a save costs something (a share of the time spent stepping: it may exceed 100%)
    assert r["checkpoint_stall_pct"] > 0 and r["checkpoint_stall_per_save_s"] > 0
    assert r["local_stall_pct"] > 0 and r["local_stall_per_save_s"] > 0
