"""The mesh travels with the jitted functions: each is built with its mesh and rules
(`sharding.jit`), so it carries its sharding constraints whoever traces it, with no mesh opened
by hand; caches of jitted functions key on the rules too; the training loop refuses implicit
host<->device copies."""

import jax
import numpy as np
import pytest
from flax.core import spmd as flax_spmd

from jaxlm import generate, infill, sharding, train
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
    return train.Setup(config, VOCAB, sharding.make_mesh((1, 4, 2)))  # 8 fake devices


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


def test_an_implicit_transfer_in_the_training_loop_is_an_error(tmp_path, monkeypatch):
    from tests.test_stages import _config, _run, _two_datasets

    (tmp_path / "data").mkdir()
    manifest = _two_datasets(tmp_path / "data", n=40, val=4)
    # A batch that was never put on the devices: the step would copy it implicitly.
    monkeypatch.setattr(sharding, "host_to_global", lambda batch, mesh: batch)
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        _run(_config(steps=2, grad_accum=1), manifest, tmp_path / "run")
