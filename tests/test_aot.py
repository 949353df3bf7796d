"""Compiling the train step for hardware this machine lacks: TPU slices through libtpu's real
compiler (compile-only devices, Mosaic kernels included) and a CUDA export.

libtpu comes with the [test] extra (`jax[tpu]`): without it these tests fail, and the error
names it (`hardware.target_devices`), rather than skip."""

import dataclasses
import glob
import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax import export

from configs import llama_1b
from jaxlm import aot, aot_report, estimate, hardware, sharding, train
from jaxlm import model as model_lib
from jaxlm import spec as run_spec
from jaxlm.errors import ConfigError
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = {"dp": (-1, 1, 1), "fsdp": (1, -1, 1), "fsdp_tp": (1, -1, 2)}


def small_config(preset="fsdp", **model):
    """A two-layer bf16 Llama whose heads (128 wide) and length (256) the splash kernel tiles."""
    c = tiny_config(d_model=256, n_heads=4, n_kv_heads=2, head_dim=128, d_ff=640, max_seq_len=256)
    c.model.dtype = "bfloat16"
    c.model.attention = "auto"  # splash on a TPU target, cuDNN on a GPU one
    for k, v in model.items():
        c.model[k] = v
    c.tokenizer.vocab_size = 1024
    c.train.seq_len = 256
    c.train.batch_size = 8
    c.mesh.preset = preset
    c.mesh.shape = MESH[preset]
    return c


def setup_for(config, target):
    target = hardware.parse_target(target)
    mesh = sharding.make_mesh(config.mesh.shape, hardware.target_devices(target))
    return train.Setup(
        run_spec.build(config), config.tokenizer.vocab_size, mesh, platform=target.platform
    )


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def test_target_names_follow_the_cloud_consoles():
    assert hardware.parse_target("v5p-64").chips == 32  # v5p counts TensorCores, two per chip
    assert hardware.parse_target("v5p-64").topology == "v5p:2x4x4"
    assert hardware.parse_target("v4-8").topology == "v4:2x2x1"
    assert hardware.parse_target("v5e-16").topology == "v5e:4x4"  # v5e counts chips
    assert hardware.parse_target("v6e-8").topology == "v6e:2x4"
    assert hardware.parse_target("h100-8").chips == 8
    assert hardware.parse_target("h200").chips == 1
    for bad, words in (("v5p-3", "two per chip"), ("v5e-12", "power-of-two"), ("x9-8", "unknown")):
        with pytest.raises(ConfigError, match=words):
            hardware.parse_target(bad)


@pytest.fixture(scope="module")
def fsdp_report():
    """small_config's fsdp step compiled for v5e-4, once for the tests that read it."""
    return aot.compile_step(small_config("fsdp"), "v5e-4")


@pytest.mark.parametrize("preset", ["dp", "fsdp", "fsdp_tp"])
def test_each_preset_compiles_for_a_tpu_slice_with_the_state_split_as_declared(preset, fsdp_report):
    config = small_config(preset)
    report = fsdp_report if preset == "fsdp" else aot.compile_step(config, "v5e-4")
    setup = setup_for(config, "v5e-4")
    state = shard_bytes(setup.abstract_state)
    batch = shard_bytes(setup.abstract_batch())
    # The compiler's argument buffers are this preset's shards of the state, plus the batch
    # (TPU layouts pad small arrays to whole tiles: a little slack).
    assert report.memory["arguments"] == pytest.approx(state + batch, rel=0.03)
    assert report.memory["aliased"] == pytest.approx(state, rel=0.03)  # the state is donated
    whole = sum(
        math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state)
    )
    expected_split = {"dp": 1, "fsdp": 4, "fsdp_tp": 4}[preset]
    assert state == pytest.approx(whole / expected_split, rel=0.02)
    assert report.model.attention == "splash"  # `auto` resolved for the TPU, not this CPU
    assert report.cost.flops > 0 and report.fits
    table = aot_report.format_report(report)
    assert all(len(line) <= estimate.WIDTH for line in table.splitlines())
    assert estimate.format_bytes(report.memory["total"]) in table


def test_splash_attention_compiles_through_mosaic_not_interpret_mode():
    setup = setup_for(small_config("fsdp_tp"), "v5e-4")
    lowered = setup.lower_train_step()
    hlo = lowered.compile().as_text()
    assert "tpu_custom_call" in hlo  # the Pallas kernel reached the TPU as a Mosaic kernel
    xla = setup_for(small_config("fsdp_tp", attention="xla"), "v5e-4")
    plain = xla.lower_train_step()
    assert "tpu_custom_call" not in plain.compile().as_text()


def test_scanned_and_accumulated_steps_count_every_layer_and_micro_batch():
    unrolled = aot.compile_step(small_config(n_layers=3), "v5e-4")
    assert unrolled.cost_method == "direct"
    config = small_config(n_layers=3, scan_layers=True)
    config.train.grad_accum = 2
    scanned = aot.compile_step(config, "v5e-4")
    assert scanned.cost_method.startswith("extrapolated")
    # The same work: three layers, the whole batch. (The optimizer update is counted once per
    # micro-batch in the extrapolation, a few percent of this tiny model's step.)
    assert scanned.cost.flops == pytest.approx(unrolled.cost.flops, rel=0.05)
    assert scanned.cost_complete and unrolled.cost_complete
    # The costing compiles are timed apart from the main one; the wall time holds both.
    assert unrolled.costing_seconds == 0 and scanned.costing_seconds > 0
    assert scanned.wall_seconds > scanned.compile_seconds + scanned.costing_seconds
    assert scanned.estimated_mfu is None or 0 < scanned.estimated_mfu < 1


def words(table: str) -> list[str]:
    """The table's words in order, rules of "=" left out: what wrapping must not change."""
    return [w for line in table.splitlines() if set(line) != {"="} for w in line.split()]


RECIPES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not p.endswith("__init__.py")
)


@pytest.mark.parametrize("recipe", RECIPES)
def test_report_lines_fit_80_columns_without_cutting_a_word(recipe, fsdp_report):
    # The compiled step's rows, with each recipe's names and shapes in the headings and
    # synthetic long notes (compiling every recipe would take an hour on two cores).
    config = importlib.import_module(f"configs.{recipe}").get_config()
    t, vocab = config.train, config.tokenizer.vocab_size
    complete = dataclasses.replace(
        fsdp_report,
        name=config.name,
        model=model_lib.ModelConfig.from_config(config.model, vocab).for_platform("tpu"),
        preset=config.mesh.preset,
        batch_size=t.batch_size,
        seq_len=t.seq_len,
        grad_accum=t.grad_accum,
    )
    long = " ".join(["a-note-of-some-length about what the compiler did"] * 9)
    undercounted = dataclasses.replace(
        complete,
        cost=dataclasses.replace(complete.cost, flops=0.0, compiler_loops=3),
        cost_method="extrapolated from 1 and 2 unrolled layers " + long,
        note=long,
        costing_seconds=123.0,
        wall_seconds=1234.0,
    )
    timed = dataclasses.replace(complete, cost=dataclasses.replace(complete.cost, seconds=1e-3))
    assert not undercounted.cost_complete and timed.estimated_mfu
    for report in (complete, timed, undercounted):
        table = aot_report.format_report(report)
        assert max(len(line) for line in table.splitlines()) <= estimate.WIDTH, table
        # Wrapping moves words to new lines and never cuts one: the words of the 80-column
        # table are the words of the table laid out on one unbounded line per row.
        assert words(table) == words(aot_report.format_report(report, width=10_000))
    table = " ".join(aot_report.format_report(undercounted).split())
    assert "1,234 s" in table and "123 s" in table  # costing compiles and wall time apart
    assert f"under the {aot.MIN_COUNTED_SHARE:.0%} needed" in table
    assert "3 loop(s) the compiler made itself" in table
    if timed.model.attention == "splash":  # how the estimate and MFU treat the kernel's FLOPs
        assert "Splash attention" in aot_report.format_report(timed)


def test_the_cost_threshold_is_one_constant_that_docs_quote():
    with open(os.path.join(ROOT, "docs", "perf.md")) as f:
        docs = " ".join(f.read().split())
    share = f"{aot.MIN_COUNTED_SHARE:.0%}"
    assert f"less than {share} of the model's FLOPs" in docs
    assert "`jaxlm.aot.MIN_COUNTED_SHARE`" in docs
    others = set(re.findall(r"less than (\d+%) of the model's FLOPs", docs)) - {share}
    assert not others


def test_the_remedy_of_a_step_that_does_not_fit_compiles_and_fits(tmp_path):
    # llama_1b's widths (where the planner is calibrated), two layers: 64 sequences of 2,048
    # per chip on v5p-8 overflow its HBM; the refusal comes from the TPU compiler itself.
    args = [
        "--config=configs/llama_1b.py",
        "--target=v5p-8",
        "--config.model.n_layers=2",
        "--config.train.batch_size=256",
        "--config.train.grad_accum=1",
        f"--json={tmp_path / 'report.json'}",
    ]
    out = subprocess.run(
        [sys.executable, "tools/compile.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        timeout=600,
    )
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    assert "does not fit on v5p-8: the TPU compiler needs" in errors[0]
    assert "GiB" in errors[0] and not re.search(r"\d(G|GB)\b", errors[0])  # one unit
    assert "Traceback" not in out.stderr + out.stdout
    assert "TPU_WORKER_HOSTNAMES" not in out.stderr + out.stdout  # libtpu's noise stays hidden
    # --json still writes the file, with the refusal and the remedy as config overrides.
    refusal = json.loads((tmp_path / "report.json").read_text())
    assert refusal["fits"] is False and refusal["error"] == errors[0].removeprefix("error: ")
    remedy = refusal["remedy"]
    assert remedy["label"] in errors[0] and refusal["needed_bytes"] > refusal["hbm"]
    assert refusal["wall_seconds"] > 0

    config = llama_1b.get_config()
    config.model.n_layers = 2
    config.train.grad_accum = 1
    for key, value in remedy["overrides"].items():
        section, name = key.split(".")
        config[section][name] = tuple(value) if isinstance(value, list) else value
    report = aot.compile_step(config, "v5p-8", with_cost=False)
    assert report.fits
    assert report.planner_memory == pytest.approx(remedy["planner_memory"])
    # The planner errs high here, never low: its remat="none" counts (XLA:CPU's buffer
    # assignment) keep more than the TPU compiler does since the scanned body's checkpoint
    # policy (measured 1.50x; it was 1.09x against the scan that kept every intermediate).
    assert report.memory["total"] <= report.planner_memory <= 1.6 * report.memory["total"]


def test_json_is_written_for_any_error(tmp_path):
    path = tmp_path / "report.json"
    args = ["--config=configs/tiny.py", "--target=v5p-3", f"--json={path}"]
    out = subprocess.run(
        [sys.executable, "tools/compile.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    row = json.loads(path.read_text())
    assert row["fits"] is None and row["name"] == "tiny" and row["target"] == "v5p-3"
    assert f"error: {row['error']}" in out.stderr.splitlines()


def test_llama_8b_on_one_v5e_chip_is_refused_before_compiling():
    from configs import llama_8b

    with pytest.raises(aot.DoesNotFit) as e:
        aot.compile_step(llama_8b.get_config(), "v5e-1")
    message = str(e.value)
    assert "\n" not in message and "optimizer state alone take 89.7 GiB" in message
    assert "--target=v5e-64" in message  # the remedy is a slice the planner says fits


def test_train_step_exports_for_cuda_without_a_gpu():
    config = small_config("fsdp", attention="xla")
    setup = setup_for(config, "h100-8")
    exported = export.export(setup.jit_train_step(), platforms=["cuda"])(
        setup.abstract_state, setup.abstract_batch()
    )
    assert exported.platforms == ("cuda",) and exported.nr_devices == 8
    leaves = jax.tree.leaves((setup.abstract_state, setup.abstract_batch()))
    assert [a.shape for a in exported.in_avals] == [x.shape for x in leaves]
    # The program carries the mesh, and parameters stay split over its fsdp axis.
    module = exported.mlir_module()
    assert '["data"=1, "fsdp"=8, "tensor"=1, "context"=1]' in module
    assert '{"fsdp"}' in module
    # `auto` attention becomes cuDNN for a bf16 model on a GPU; where cuDNN cannot lower (no
    # CUDA plugin here) the report says it exported the XLA path instead.
    report = aot.compile_step(small_config("fsdp"), "h100-8")
    assert report.memory is None and report.cost is None
    assert report.model.attention in ("cudnn", "xla")
    if report.model.attention == "xla":
        assert "XLA attention" in report.note


def test_installing_libtpu_leaves_a_cpu_run_on_the_cpu_and_quiet():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    out = subprocess.run(
        [sys.executable, "-c", "import jaxlm, jax; print(jax.default_backend())"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "cpu"
    assert "TPU" not in out.stderr, out.stderr


def test_rows_of_a_report_are_consistent():
    target = hardware.parse_target("v5p-8")
    cost = aot.Cost(flops=1e12, seconds=0.5, bytes_accessed=1e9)
    report = aot.Report(
        name="x",
        target=target,
        mesh_shape={"data": 1, "fsdp": 4, "tensor": 1},
        preset="fsdp",
        model=setup_model(),
        batch_size=8,
        seq_len=256,
        grad_accum=1,
        compile_seconds=1.0,
        memory={"arguments": 1.0, "outputs": 1.0, "aliased": 1.0, "temp": 2.0, "total": 3.0},
        planner_memory=3.3,
        cost=cost,
        cost_method="direct",
        model_flops_per_step=1.8e12,
    )
    assert report.estimated_tokens_per_second == 8 * 256 / 0.5
    np.testing.assert_allclose(report.estimated_mfu, 1.8e12 / (0.5 * 4 * 459e12))
    assert report.fits and "+10% vs compiler" in aot_report.format_report(report)


def setup_model():
    from jaxlm import model

    return model.ModelConfig(vocab_size=61, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
                             head_dim=4, d_ff=16)  # fmt: skip
