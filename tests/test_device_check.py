"""benchmarks/device_check.py on CPU: every path that needs no GPU, and a comparison that can fail.

The script runs once as a user would (`--cpu_smoke`, one CPU device, ~1-2 minutes on 2 cores);
the tests read its files. The GPU-only parts (cuDNN, full-size benchmarks) are only checked
for being skipped with a reason.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import device_check as dc
from jaxlm import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The script's --cpu_smoke run: (report dict, markdown file text, stdout)."""
    out = tmp_path_factory.mktemp("device_check")
    # One CPU device, as a user has it: conftest's 8 fake devices would not divide batch 4.
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    cmd = [sys.executable, "benchmarks/device_check.py", "--cpu_smoke", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / dc.JSON_NAME) as f:
        report = json.load(f)
    return report, (out / dc.MD_NAME).read_text(), proc.stdout


def test_json_holds_every_part(smoke):
    report, _, _ = smoke
    assert report["ok"] is True
    assert report["meta"]["cpu_smoke"] is True and report["meta"]["platform"] == "cpu"
    assert set(report["attention_check"]["quantities"]) == {"out", "dq", "dk", "dv"}
    assert set(report["model_check"]["quantities"]) == {"logits", "grads"}
    assert {(r["config"], r["attention"]) for r in report["bench"]} == {
        ("gpt2_124m", "xla"),
        ("llama_1b", "xla"),
    }
    for row in report["bench"]:
        assert {"step_time_s", "tokens_per_s", "mfu_pct", "compile_s", "params_m"} <= set(row)
    parts = {"attention_check", "model_check", "bench gpt2_124m xla", "bench llama_1b xla"}
    assert set(report["meta"]["seconds"]) == parts


def test_gpu_only_parts_are_skipped_with_one_line_each(smoke):
    report, _, _ = smoke
    skipped = report["skipped"]
    assert any(s.startswith("bench gpt2_124m cudnn: ") for s in skipped)
    assert any(s.startswith("bench llama_1b cudnn: ") for s in skipped)
    assert all("\n" not in s and ("GPU" in s or "stands in" in s) for s in skipped)


def test_xla_against_itself_is_bitwise_equal_but_not_equal_to_fp32(smoke):
    report, _, _ = smoke
    for check in ("attention_check", "model_check"):
        for name, q in report[check]["quantities"].items():
            assert q["max_abs_diff"] == 0.0 and q["relative"] == 0.0, (check, name)
            # bf16 really ran: the fp32 reference differs, within the stated tolerance
            assert 0 < q["a_vs_ref"] == q["b_vs_ref"] < q["tolerance"], (check, name)


def test_tokens_per_second_is_tokens_per_step_over_step_time(smoke):
    report, _, _ = smoke
    for r in report["bench"]:
        assert r["tokens_per_step"] == r["batch_size"] * r["seq_len"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_time_s"])
        assert 0 < r["mfu_pct"] < 100


def test_markdown_has_one_row_per_benchmark(smoke):
    report, md, stdout = smoke
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(dc.BENCH_HEADER))
    rows = []
    for line in lines[start + 2 :]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append(line)
    assert len(rows) == len(report["bench"]) == 2
    assert [r.split("|")[1].strip() for r in rows] == [r["config"] for r in report["bench"]]
    assert md in stdout  # printed as well as written


def test_compare_reports_a_perturbation_and_names_the_leaf():
    rng = np.random.RandomState(0)
    big, small = rng.randn(7, 11).astype(np.float32), 1e-3 * rng.randn(13).astype(np.float32)
    tree = {"big": big, "small": small}
    same = dc.compare(tree, tree, tree, tol=2**-6)
    assert same["max_abs_diff"] == 0.0 and same["ok"]
    bumped = {"big": big, "small": small.copy()}
    bumped["small"][3] += 0.1 * np.abs(small).max()  # tiny next to `big`, 10% of its own leaf
    r = dc.compare(tree, bumped, tree, tol=2**-6)
    assert r["max_abs_diff"] > 0 and not r["ok"]
    assert r["relative"] == pytest.approx(0.1, rel=1e-3)
    assert r["worst_leaf"] == "['small']"


def _wrong_groups(q, k, v, mask):  # kv head j serves query heads j, j+K, ... (tile, not repeat)
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.tile(k, (1, 1, groups, 1)), jnp.tile(v, (1, 1, groups, 1))
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


BUGS = {
    "mask leaks across documents": lambda q, k, v, mask: jax.nn.dot_product_attention(
        q, k, v, mask=jnp.tril(jnp.ones(mask.shape[-2:], bool))[None, None]
    ),
    "softmax scale 1/E": lambda q, k, v, mask: jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=1 / q.shape[-1]
    ),
    "kv heads grouped wrongly": _wrong_groups,
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_the_attention_tolerances_catch_a_real_bug(bug):
    """Loose enough for bf16 rounding (two runs of the right code pass), tight enough that a
    plausible kernel bug fails the output and every gradient."""
    B, L, H, K, E = 2, 32, 4, 2, 16
    seg = jnp.asarray(dc.packed_batch(B, L, vocab=2, seed=3)["segment_ids"])
    assert len(np.unique(np.asarray(seg[1]))) > 1  # a row that really holds several documents
    mask = model_lib.attention_mask(seg, seg)
    keys = jax.random.split(jax.random.key(1), 4)
    q, ct = (jax.random.normal(key, (B, L, H, E), jnp.bfloat16) for key in keys[:2])
    k, v = (jax.random.normal(key, (B, L, K, E), jnp.bfloat16) for key in keys[2:])
    right = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)  # noqa: E731
    wrong = lambda q, k, v: BUGS[bug](q, k, v, mask)  # noqa: E731

    def run(att, dtype):
        out, vjp = jax.vjp(att, *(x.astype(dtype) for x in (q, k, v)))
        return dict(zip(("out", "dq", "dk", "dv"), (out, *vjp(ct.astype(dtype))), strict=True))

    ref, good, bad = run(right, jnp.float32), run(right, jnp.bfloat16), run(wrong, jnp.bfloat16)
    for name in ref:
        tol = dc.TOLERANCES[name]
        assert dc.compare(good, run(right, jnp.bfloat16), ref, tol)["ok"]
        assert dc.compare(good[name], bad[name], ref[name], tol)["ok"] is False, name


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="on a GPU the parts would run")
def test_without_a_gpu_or_smoke_flag_every_part_is_skipped(tmp_path):
    plan = dataclasses.replace(dc.SMOKE, impls=("xla", "cudnn"))
    report = dc.run(plan, str(tmp_path), smoke=False)
    assert report["ok"] and report["bench"] == [] and "attention_check" not in report
    assert len(report["skipped"]) == 2 + 2 * 2  # two checks, two configs x two attentions
    assert all(s.count(":") >= 1 and "GPU" in s for s in report["skipped"])
    assert "Skipped:" in (tmp_path / dc.MD_NAME).read_text()
