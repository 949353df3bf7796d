"""The planner's numbers: exact counts, 6ND, hand-checked time and cost, memory against XLA."""

import contextlib
import glob
import importlib
import io
import math
import os
import re
import subprocess
import sys

import jax
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from configs import base, llama_8b, tiny
from jaxlm import estimate as est_lib
from jaxlm import estimate_table, estimate_xla, metrics, sharding, train
from jaxlm import model as model_lib
from jaxlm import spec as run_spec
from jaxlm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A host CPU as "hardware", so attention="auto" resolves as the trainer resolves it here (xla).
CPU = est_lib.Hardware("host CPU", peak_flops=1e12, memory_bytes=64 * est_lib.GiB, platform="cpu")


def gpt3_config():
    """GPT-3 175B's shapes in this codebase's terms (SwiGLU width 8/3 d keeps 12 d^2 per layer)."""
    c = base.get_config()
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim = 12288, 96, 96, 96, 128
    m.d_ff, m.max_seq_len, m.tie_embeddings = 32768, 2048, True
    c.tokenizer.vocab_size = 50257
    c.train.seq_len, c.train.batch_size = 2048, 1536
    return c


def larger_config():
    """A CPU-compilable step seven times the tiny recipe's size: 29M parameters, 8 layers."""
    c = tiny.get_config()
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim = 512, 8, 8, 4, 64
    m.d_ff, m.max_seq_len, m.tie_embeddings = 1536, 512, False
    c.train.seq_len, c.train.batch_size = 512, 8
    return c


def test_6nd_for_gpt3_175b_on_300b_tokens_is_3_15e23():
    assert est_lib.training_flops_6nd(175e9, 300e9) == pytest.approx(3.15e23, rel=1e-12)
    est = est_lib.estimate(gpt3_config(), "a100", chips=1024, tokens=300e9)
    assert est.params.total == pytest.approx(175e9, rel=0.01)  # 174.6B, as in the GPT-3 paper
    assert est.train_flops_6nd == pytest.approx(3.15e23, rel=0.01)


def test_llama_8b_recipe_has_8_03b_parameters():
    config = llama_8b.get_config()
    assert config.tokenizer.vocab_size == 128256
    cfg = model_lib.ModelConfig.from_config(config.model, config.tokenizer.vocab_size)
    counts = est_lib.param_counts(cfg)  # jax.eval_shape: nothing is allocated
    assert counts.total == 8_030_261_248
    assert f"{counts.total / 1e9:.2f}" == "8.03"
    D, F, V, layers = 4096, 14336, 128256, 32
    assert counts.embedding == 2 * V * D and counts.head == V * D
    assert counts.attention == layers * (2 * D * D + 2 * D * 1024)
    assert counts.mlp == layers * 3 * D * F
    assert counts.norms == (2 * layers + 1) * D
    assert counts.total == model_lib.count_params(nnx.state(model_lib.abstract(cfg)))


def hand_config():
    """A fixed small model, so the hand-computed figures below do not follow recipe changes."""
    c = tiny.get_config()
    c.model.update(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=768)
    c.model.tie_embeddings = True
    c.train.update(steps=600, batch_size=16, seq_len=256)
    return c


def test_time_and_cost_match_a_hand_computation():
    # This model: 4,196,608 parameters, tied, so all of them are matmul weights; attention adds
    # 6 x 4 layers x 8 heads x 32 x 256 = 1,572,864: 6 x 4,196,608 + 1,572,864 = 26,752,512.
    chip = est_lib.Hardware("test chip", peak_flops=100e12, memory_bytes=16 * est_lib.GiB)
    est = est_lib.estimate(
        hand_config(), chip, chips=2, mfu=0.5, price_per_chip_hour=2.5, tokens=1e12
    )
    assert est.flops_per_token == 26_752_512
    # 1e12 tokens x 26,752,512 FLOPs / (2 chips x 100e12 x 0.5) = 267,525.12 s.
    assert est.tokens_per_second == pytest.approx(1e14 / 26_752_512)
    assert est.seconds == pytest.approx(267_525.12)
    assert est.chip_hours == pytest.approx(2 * 267_525.12 / 3600)  # 148.6251 chip-hours
    assert est.cost == pytest.approx(371.5626667)
    assert est.train_flops == pytest.approx(2.6752512e19)


def test_default_tokens_are_steps_times_batch_times_length():
    est = est_lib.estimate(hand_config(), "h100", chips=1)
    assert est.tokens == 600 * 16 * 256


def test_chinchilla_budget_for_the_8b_recipe():
    est = est_lib.estimate(llama_8b.get_config(), "h100", chips=64)
    assert est.chinchilla_tokens == 20 * 8_030_261_248
    assert est.tokens == 38_000 * 512 * 8192
    assert est.tokens / est.chinchilla_tokens == pytest.approx(0.99, abs=0.01)
    assert est.chinchilla_params == pytest.approx(math.sqrt(est.tokens * est.params.total / 20))


def test_trainer_mfu_and_planner_read_one_chip_table():
    # What jax reports as device_kind on each chip -> the planner's entry for that chip.
    kinds = {"TPU v4": "tpu-v4", "TPU v5 lite": "tpu-v5e", "TPU v5": "tpu-v5p",
             "TPU v6 lite": "tpu-v6e", "NVIDIA H100 80GB HBM3": "h100", "NVIDIA H200": "h200",
             "NVIDIA A100-SXM4-80GB": "a100"}  # fmt: skip
    for kind, key in kinds.items():
        device = type("Device", (), {"device_kind": kind})()
        assert metrics.peak_flops_per_device(device) == est_lib.HARDWARE[key].peak_flops, kind
    assert metrics.peak_flops_per_device(type("D", (), {"device_kind": "cpu"})()) is None
    assert est_lib.get_hardware("TPU v5p") is est_lib.get_hardware("v5p")


def test_table_is_readable_in_80_columns():
    for config, chips in ((tiny.get_config(), 1), (llama_8b.get_config(), 8)):
        table = estimate_table.format_table(est_lib.estimate(config, "h100", chips, 0.45, 2.5))
        lines = table.splitlines()
        assert max(len(line) for line in lines) <= 80
        headers = [line.split()[0] for line in lines if not line.startswith((" ", "="))]
        assert headers[1:] == ["Model", "Compute", "Memory", "Time", "Chinchilla", "Suggestions"]
        assert "$" in table


RECIPES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not p.endswith("__init__.py")
)


def _words(table: str) -> list[str]:
    """The table's words in order, rules of "=" left out: what wrapping must not change."""
    return [w for line in table.splitlines() if set(line) != {"="} for w in line.split()]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_table_fits_80_columns_without_cutting_a_word(recipe):
    config = importlib.import_module(f"configs.{recipe}").get_config()
    # As shipped (the recipe's chips, with a price), and on the fewest v5e chips its mesh
    # allows (one, but for fixed axes): too small for most, so the suggestions list and the
    # TPU attention (splash) appear.
    fewest = math.prod(s for s in config.mesh.shape if s > 0)
    for hardware, chips in (("h100", None), ("tpu-v5e", fewest)):
        est = est_lib.estimate(config, hardware, chips, 0.45, 2.5)
        table = estimate_table.format_table(est)
        assert max(len(line) for line in table.splitlines()) <= est_lib.WIDTH, table
        # Wrapping moves words to new lines and never cuts one.
        assert _words(table) == _words(estimate_table.format_table(est, width=10_000))


def test_remedies_that_claim_to_fit_do_fit():
    config = llama_8b.get_config()  # 8 sequences of 8,192 per chip on 8 chips: too big
    est = est_lib.estimate(config, "h100", chips=8)
    assert not est.memory.fits
    fitting = [r for r in est.remedies if r.fits]
    assert any("train.grad_accum" in r.overrides for r in fitting)
    for remedy in fitting:  # each remedy's overrides, applied to the config, fit
        changed = llama_8b.get_config()
        for key, value in remedy.overrides.items():
            section, name = key.split(".")
            changed[section][name] = value
        assert est_lib.estimate(changed, "h100", chips=8).memory.total == remedy.total
        line = next(s for s in est.suggestions if s.startswith(remedy.label))
        assert line.endswith(" fits")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: est_lib.estimate(c, "h900"), "unknown hardware 'h900'; choose one of tpu-v4"),
        (lambda c: est_lib.estimate(c, mfu=-0.1), "mfu must be a fraction in (0, 1]"),
        (lambda c: est_lib.estimate(c, mfu=1.5), "mfu must be a fraction in (0, 1]"),
        (lambda c: est_lib.estimate(c, chips=0), "chips must be a positive whole number"),
        (lambda c: est_lib.estimate(c, chips=-8), "chips must be a positive whole number"),
    ],
)
def test_bad_input_is_one_sentence(call, message):
    with pytest.raises(ConfigError) as e:
        call(tiny.get_config())
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value) and str(e.value).endswith(".")


def _cli(*args):
    return subprocess.run(
        [sys.executable, "tools/estimate.py", "--config=configs/tiny.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_the_table():
    out = _cli("--hardware=h100", "--chips=8", "--mfu=0.45", "--price-per-chip-hour=2.5")
    assert out.returncode == 0, out.stderr
    assert "Memory per device" in out.stdout and "cost" in out.stdout


def test_cli_bad_input_is_one_error_line():
    out = _cli("--hardware=h900", "--mfu=-1")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "error: unknown hardware 'h900'; choose one of tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e, a100, "
        "h100, h200, b200, or give peak FLOP/s and memory per chip yourself (Hardware(...), or "
        "--hardware=custom --peak-tflops=... --hbm-gib=...)."
    ]


# --------------------------------------------------------------------------- memory


def test_state_bytes_equal_train_setup_shards():
    config = larger_config()
    setup = train.Setup(
        run_spec.build(config), 4096, sharding.make_mesh(config.mesh.shape)
    )  # 8 fake devices
    shard_bytes = lambda tree: sum(  # noqa: E731
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )
    mem = est_lib.estimate(config, CPU, chips=8).memory
    assert mem.params == shard_bytes(setup.abstract_state["params"])
    assert mem.opt_state == shard_bytes(setup.abstract_state["opt_state"])


def _jax_saved_bytes(config, vocab, batch, seq_len):
    """Bytes of the residuals JAX saves for the backward pass, parameters excluded."""
    cfg = model_lib.ModelConfig.from_config(config.model, vocab).for_platform()
    graphdef, state = nnx.split(model_lib.abstract(cfg))
    shape = jax.ShapeDtypeStruct((batch, seq_len), "int32")
    data = {k: shape for k in ("inputs", "targets", "segment_ids", "positions")}
    data["loss_mask"] = jax.ShapeDtypeStruct((batch, seq_len), "float32")
    out = io.StringIO()
    loss = lambda params, batch: train.loss_sums(graphdef, params, batch)[0]  # noqa: E731
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, nnx.to_pure_dict(state), data)
    size = {"f32": 4, "bf16": 2, "i32": 4, "bool": 1}
    total = 0
    for line in out.getvalue().splitlines():
        if "argument" not in line:
            dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
            total += size[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


@pytest.mark.parametrize("remat", ["full", "dots"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_remat_policies_save_what_jax_saves(remat, dtype):
    # XLA:CPU hoists recomputation, so its totals cannot check remat; JAX's residuals can.
    saved = []
    for layers in (2, 3):
        c = larger_config()
        c.model.update(n_layers=layers, remat=remat, dtype=dtype, d_model=80, d_ff=224)
        c.train.update(batch_size=2, grad_accum=1, seq_len=96)
        saved.append(_jax_saved_bytes(c, 1000, 2, 96))
    per_layer = est_lib.estimate(c, CPU, chips=1, vocab_size=1000).memory.saved_per_layer
    assert per_layer == saved[1] - saved[0]


def test_remat_orders_memory():
    totals = {}
    for remat in ("none", "dots", "full"):
        c = larger_config()
        c.model.remat = remat
        totals[remat] = est_lib.estimate(c, CPU, chips=1).memory.activations
    assert totals["none"] > totals["dots"] > totals["full"]


@pytest.mark.parametrize(
    "name, devices",
    [
        ("tiny", 1),
        ("tiny", 8),
        pytest.param("larger", 1, marks=pytest.mark.slow),
        pytest.param("larger", 8, marks=pytest.mark.slow),
    ],
)
def test_memory_within_20_percent_of_xla(name, devices):
    config = tiny.get_config() if name == "tiny" else larger_config()  # fsdp preset, remat none
    xla = estimate_xla.xla_memory(config, devices=jax.devices()[:devices])["total"]
    ours = est_lib.estimate(config, CPU, chips=devices).memory.total
    assert ours == pytest.approx(xla, rel=0.2), (ours / 2**20, xla / 2**20)


# --------------------------------------------------------------------------- mixture of experts


@pytest.mark.parametrize(
    "recipe, total, active",
    [
        ("olmoe_1b_7b", 6_919_161_856, 1_282_017_280),  # OLMoE's "1B active, 7B total"
        ("qwen3_30b_a3b", 30_532_122_624, 3_353_032_704),  # Qwen3's "30.5B total, 3.3B active"
    ],
)
def test_moe_recipes_count_total_and_active_parameters(recipe, total, active):
    config = importlib.import_module(f"configs.{recipe}").get_config()
    est = est_lib.estimate(config, "tpu-v5p", chips=64)
    p, m = est.params, est.model
    assert (p.total, p.active) == (total, active)
    # Model FLOPs per token: 6 x the active weights a token is multiplied by (the input
    # embedding is a lookup), plus attention; 6ND counts the active parameters too.
    matmul = p.active - (p.embedding - p.head)
    assert est.flops_per_token == 6 * matmul + est.attention_flops_per_token
    assert est.train_flops_6nd == 6 * active * est.tokens
    table = estimate_table.format_table(est)
    assert f"{active:,}: top-8 of {m.moe.n_experts} experts" in table
    assert "N = active parameters" in table and "MoE dispatch" in table


def test_moe_memory_splits_experts_over_the_expert_axis_and_counts_dispatch_buffers():
    from jaxlm import estimate_moe

    config = importlib.import_module("configs.olmoe_1b_7b").get_config()
    X, D, F, layers = 64, 2048, 1024, 16

    def plan(shape, grad_accum=32, chips=32):
        config.mesh.shape, config.train.grad_accum = shape, grad_accum
        return est_lib.estimate(config, "tpu-v5p", chips=chips)

    group8, group16 = plan((-1, 8, 1)), plan((-1, 16, 1))
    # The experts' fp32 weights are split whole over the expert group, G = the fsdp axis.
    assert group8.memory.expert_params == layers * 3 * X * D * F * 4 / 8
    assert group16.memory.expert_params == group8.memory.expert_params / 2
    # Dropless dispatch, as the TPU compiler measures it: the chip's tokens x top_k x all
    # experts x D, whatever the group; doubling the micro-batch doubles it.
    assert estimate_moe.dispatch_rows(group8.model, group8.layout) == 8 * 4096 * 8
    assert group16.memory.dispatch == group8.memory.dispatch
    assert group8.memory.dispatch == estimate_moe.DROPLESS_PER_EXPERT_VALUE * 4096 * 8 * X * D * 2
    assert plan((-1, 8, 1), grad_accum=16).memory.dispatch == 2 * group8.memory.dispatch
    assert group8.memory.working >= group8.memory.dispatch
    # Capacity mode holds factor x tokens x top_k slots per device, whatever the group.
    config.model.moe.capacity_factor = 1.25
    capacity = plan((-1, 16, 1))
    rows = estimate_moe.dispatch_rows(capacity.model, capacity.layout)
    assert rows == math.ceil(1.25 * 4096 * 8 / X) * X
