"""The mesh travels with the jitted functions: each is built with its mesh and rules
(`sharding.jit`), so it carries its sharding constraints whoever traces it, with no mesh opened
by hand; caches of jitted functions key on the rules too; the training loop refuses implicit
host<->device copies."""

import traceback

import jax
import numpy as np
import pytest
from flax.core import spmd as flax_spmd

from jaxlm import generate, infill, sharding, train
from jaxlm import spec as run_spec
from jaxlm.evaluate import choices, scoring
from tests.helpers import tiny_config

VOCAB = 62  # even: fsdp_tp splits the vocab over tensor=2
B, L = 8, 16
# The constraint on (batch, seq, heads, head_dim) under fsdp_tp: rows over data x fsdp, heads
# over tensor. Under dp (or no mesh) no constraint names `tensor`.
HEADS_SPLIT = '<@mesh, [{"data", "fsdp"}, {}, {"tensor"}, {}]>'


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    config.mesh.preset = "fsdp_tp"
    return train.Setup(
        run_spec.build(config), VOCAB, sharding.make_mesh((1, 4, 2))
    )  # 8 fake devices


def _int32(*shape):
    return jax.ShapeDtypeStruct(shape, np.int32)


def _lower_entry_points(setup, mesh_rules):
    """The lowered text of every jitted entry point, built for `mesh_rules`."""
    params = setup.abstract_state["params"]
    graphdef = setup.graphdef
    rows = {k: _int32(B, L) for k in ("inputs", "targets", "segment_ids", "positions")}
    rows["loss_mask"] = jax.ShapeDtypeStruct((B, L), np.float32)
    context = {k: _int32(B, L) for k in ("context", "context_segments", "context_positions")}
    continuations = {k: _int32(B, 2, 8) for k in ("inputs", "targets", "segments", "positions")}
    continuations["mask"] = _int32(B, 2, 8)
    key = jax.eval_shape(lambda: jax.random.key(0))
    sampling = dict(max_new_tokens=3, temperature=0.0, top_k=0, top_p=1.0)
    lowered = {
        "generate": generate.jitted_generate(mesh_rules).lower(
            graphdef, params, _int32(B, 5), _int32(B, 5), key, 1, **sampling
        ),
        "score": scoring.jitted_scorer(mesh_rules).lower(graphdef, params, rows, num_segments=4),
        "choices": choices.jitted_continuations(mesh_rules).lower(
            graphdef, params, {**context, **continuations}, num_segments=4
        ),
        "infill": infill.jitted_encoder_logits(mesh_rules).lower(graphdef, params, _int32(B, L)),
    }
    if mesh_rules is setup.mesh_rules:  # the run's own steps
        lowered["train"] = setup.lower_train_step()
        lowered["eval"] = setup.jit_eval_step().lower(params, setup.abstract_batch())
    return {name: low.as_text() for name, low in lowered.items()}


def test_every_jitted_entry_point_carries_its_mesh_and_rules_with_none_ambient(setup):
    assert not hasattr(sharding, "use") and not hasattr(sharding, "_active")
    assert jax.sharding.get_abstract_mesh().empty and not flax_spmd.get_logical_axis_rules()
    texts = _lower_entry_points(setup, setup.mesh_rules)
    assert sorted(texts) == ["choices", "eval", "generate", "infill", "score", "train"]
    for name, text in texts.items():
        assert HEADS_SPLIT in text, f"{name} lost the fsdp_tp constraints"
    # The same functions built without a mesh have no constraints: they came from the builder.
    for name, text in _lower_entry_points(setup, None).items():
        assert "sdy.sharding_constraint" not in text, name

    # A context the caller opens (here the same mesh under the dp rules) changes nothing: each
    # function traces under the mesh and rules it was built with.
    other = sharding.MeshRules.of(setup.mesh, "dp")
    with other.tracing():
        assert setup.lower_train_step().as_text() == texts["train"]
    assert jax.sharding.get_abstract_mesh().empty and not flax_spmd.get_logical_axis_rules()


def test_caches_of_jitted_functions_key_on_the_rules_not_only_the_mesh(setup):
    dp = sharding.MeshRules.of(setup.mesh, "dp")
    same = sharding.MeshRules.of(setup.mesh, "fsdp_tp")
    assert same == setup.mesh_rules and hash(same) == hash(setup.mesh_rules)
    for cached in (
        generate.jitted_generate,
        scoring.jitted_scorer,
        choices.jitted_continuations,
        infill.jitted_encoder_logits,
    ):
        assert cached(same) is cached(setup.mesh_rules)
        assert cached(dp) is not cached(setup.mesh_rules)
    dp_texts = _lower_entry_points(setup, dp)
    assert all(HEADS_SPLIT not in t and "sdy.sharding_constraint" in t for t in dp_texts.values())


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from tests.test_stages import _two_datasets

    return _two_datasets(tmp_path_factory.mktemp("data"), n=40, val=4)


def test_an_implicit_transfer_in_the_training_loop_is_an_error(manifest, tmp_path, monkeypatch):
    from tests.test_stages import _config, _run

    # A batch that was never put on the devices: the step would copy it implicitly.
    monkeypatch.setattr(sharding, "host_to_global", lambda batch, mesh: batch)
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        _run(_config(steps=2, grad_accum=1), manifest, tmp_path / "run")


@pytest.fixture
def implicit_reads(monkeypatch):
    """Where implicit device->host reads (np.asarray, float, ...) happen under a 'disallow'
    guard. A CPU lets them through (its arrays are host memory) but a GPU or TPU refuses them,
    so the CPU tests record them instead. Reads jax internals: the guard's thread-local state."""
    from jax._src import array as array_impl
    from jax._src import config

    reads = []

    def record(x):
        explicit = config.guard_lib.thread_local_state().explicit_device_get  # jax.device_get
        if config.transfer_guard_device_to_host.value == "disallow" and not explicit:
            caller = traceback.extract_stack()[-3]
            reads.append(f"{caller.filename}:{caller.lineno}")

    value = array_impl.ArrayImpl._value.fget

    def recorded_value(x):
        record(x)
        return value(x)

    def reading(convert):  # a CPU array reaches numpy through the buffer protocol, not _value
        def converted(a, *args, **kwargs):
            if isinstance(a, jax.Array):
                record(a)
            return convert(a, *args, **kwargs)

        return converted

    monkeypatch.setattr(array_impl.ArrayImpl, "_value", property(recorded_value))
    monkeypatch.setattr(np, "asarray", reading(np.asarray))
    monkeypatch.setattr(np, "array", reading(np.array))
    two = jax.numpy.ones(()) + 1
    with jax.transfer_guard("disallow"):
        float(two)  # the recorder can fail
    assert len(reads) == 1
    reads.clear()
    return reads


def test_the_training_loop_reads_devices_only_explicitly(manifest, tmp_path, implicit_reads):
    """Steps, held-out evaluation, saves (sync and async), a staged run's micro-batches, a
    preemption and its resume: every device->host copy is explicit, as a GPU or TPU demands."""
    from tests.test_stages import _config, _run, _staged_config

    plain = _config(steps=4, grad_accum=1)
    staged = _staged_config("adamw")
    for config in (plain, staged):
        config.eval.every = config.checkpoint.every = 2
    plain.checkpoint.async_save = True
    assert _run(plain, manifest, tmp_path / "plain", stop_at=2)[1]["preempted"]
    assert _run(plain, manifest, tmp_path / "plain")[1]["final_step"] == 4
    assert _run(staged, manifest, tmp_path / "staged")[1]["final_step"] == 8  # 4 + 4 steps
    assert implicit_reads == []
