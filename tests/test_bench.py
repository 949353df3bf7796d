"""tools/bench.py: its peak really is matmul work, and its figures agree with each other."""

import jax
import numpy as np
import pytest

from tests.helpers import VOCAB, tiny_config
from tools import bench


def test_matmul_peak_computes_the_product_it_times():
    peak = bench.MatmulPeak(n=64, repeats=3)
    a = np.asarray(peak.a)
    np.testing.assert_allclose(np.asarray(peak.f(peak.a)), a @ a @ a @ a, rtol=1e-5)
    assert peak.flops == 2 * 64**3 * 3
    assert peak.measure() > 0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU peak path")
def test_bench_figures_are_consistent(tmp_path):
    config = tiny_config()
    config.checkpoint.keep = 2
    r = bench.bench(config, steps=4, rounds=2, vocab=VOCAB, checkpoint_every=2, split=False)
    B, L = config.train.batch_size, config.train.seq_len
    m = config.model
    D, H, K, E, F = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff
    # Counted by hand: every weight (norm scales included, as 6N counts them) and the tied head.
    per_layer = D * H * E + 2 * D * K * E + H * E * D + 3 * D * F + 2 * D
    n_matmul = m.n_layers * per_layer + D + VOCAB * D
    flops_per_step = (6 * n_matmul + 6 * m.n_layers * H * E * L) * B * L
    assert r["tokens_per_s"] == pytest.approx(B * L / r["step_time_s"])
    assert r["step_time_min_s"] <= r["step_time_s"]
    mfu = 100 * flops_per_step / r["step_time_s"] / (r["peak_tflops_per_s"] * 1e12)
    assert r["mfu_pct"] == pytest.approx(mfu)
    assert 0 < r["mfu_pct"] < 100  # a model cannot beat the matmul peak it is measured against
    assert 0 <= r["checkpoint_stall_pct"] < 100
