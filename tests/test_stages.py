"""Multi-stage training: the stage plan and its composite learning rate, the staged data stream
(mixture shares per stage, exact resume across a stage boundary), and whole staged runs that
resume bitwise, compile once per shape and follow the planned schedule.

Runs use synthetic data (documents of random ids in two datasets, written with
`records.ShardWriter`) and a one-layer model, driven through `loop.Trainer` in-process.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from jaxlm import loop, sharding, stages, train
from jaxlm import spec as run_spec
from jaxlm.data import stream as stream_lib
from jaxlm.errors import ConfigError
from jaxlm.evaluate import trained
from tests.helpers import (
    BOS,
    EOS,
    FakeTokenizer,
    batch_rows,
    lane_documents,
    tiny_config,
    write_manifest,
)

VOCAB = 61


def _two_datasets(root, n: int = 1200, max_len: int = 12, val: int = 40) -> dict:
    """Datasets 'a' and 'b' whose documents start with tag 3 or 4: the tag names the source."""
    rng = np.random.RandomState(0)

    def docs(tag, count):
        return [
            [tag, *rng.randint(5, VOCAB, size=rng.randint(0, max_len)).tolist()]
            for _ in range(count)
        ]

    return write_manifest(
        root,
        {
            "a": {"train": docs(3, n), "val": docs(3, val)},
            "b": {"train": docs(4, n), "val": docs(4, val)},
        },
    )


@pytest.fixture(scope="module", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
    """A persistent compilation cache, unless the suite already has one: a resumed run
    re-traces the same programs, and compiling each once keeps these runs to seconds on CPU."""
    if jax.config.jax_compilation_cache_dir:
        yield
        return
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return _two_datasets(tmp_path_factory.mktemp("data"))


def _config(**train_overrides):
    c = tiny_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 1, 4, 2
    c.model.head_dim, c.model.d_ff, c.model.max_seq_len = 8, 64, 32
    c.data.datasets = {"a": dict(paths="x", weight=1.0), "b": dict(paths="x", weight=1.0)}
    c.train.steps = 0
    c.train.batch_size = 4
    c.train.grad_accum = 2  # micro-batch of 2 rows
    c.train.seq_len = 16
    c.train.log_every = 1
    c.train.spike_ratio = 0.0
    c.eval.every = 0
    c.eval.max_batches = 1
    c.eval.next_line_examples = 0
    c.checkpoint.every = 100  # only the final save and the stops' (the preemption path)
    c.checkpoint.keep = 100
    c.checkpoint.async_save = False
    c.logging.tensorboard = False
    c.sample.max_tokens = 0
    for k, v in train_overrides.items():
        setattr(c.train, k, v)
    return c


STAGES = (
    dict(
        name="short",
        steps=4,
        weights=dict(a=0.8, b=0.2),
        seq_len=16,
        batch_size=2,
        lr=dict(warmup=2),
    ),
    dict(
        name="long",
        steps=4,
        weights=dict(a=0.2, b=0.8),
        seq_len=32,
        batch_size=4,
        lr=dict(decay="wsd", decay_fraction=0.5, end=0.1),
        rope_theta=40_000.0,
    ),
)  # fmt: skip  (a batch ramp, a length curriculum, a change of mix and a RoPE extension)


# --------------------------------------------------------------------------- the plan


def test_composite_schedule_follows_each_segment_and_joins_without_jumps():
    c = _config()
    c.optim.lr = 1.0
    c.stages = (
        dict(steps=4, lr=dict(warmup=2)),
        dict(steps=10, lr=dict(decay="wsd", decay_fraction=0.4, end=0.1)),
        dict(steps=3),  # no segment: holds where the cool-down ended
        dict(steps=2, lr=dict(peak=0.5)),  # a jump, asked for
    )
    plan = stages.build(c)
    lr = [float(plan.schedule(n)) for n in range(plan.total_steps)]
    # warmup 0.5, 1 | hold 6 | 4 cool-down steps to 0.1 | 3 at 0.1 | 2 at 0.5
    expected = [0.5, 1.0, 1.0, 1.0] + [1.0] * 6 + [0.775, 0.55, 0.325, 0.1] + [0.1] * 3 + [0.5] * 2
    np.testing.assert_allclose(lr, expected, rtol=1e-6)
    assert [s.start for s in plan.stages] == [0, 4, 14, 17] and plan.total_steps == 19
    assert plan.stage_at(3).index == 0 and plan.stage_at(4).index == 1


def test_without_lr_segments_the_run_follows_optim_schedule_over_all_stages():
    c = _config()
    c.stages = (dict(steps=5), dict(tokens=6 * 4 * 16))  # 6 steps of 4 x 16 tokens
    plan = stages.build(c)
    c2 = _config(steps=11)
    reference = stages.build(c2)  # no stages: optim.* as one segment over 11 steps
    assert plan.total_steps == 11 and len(reference.stages) == 1
    for n in range(12):
        assert float(plan.schedule(n)) == float(reference.schedule(n))


# --------------------------------------------------------------------------- the stream


def _stream(m, plan, stream=0, streams=1):
    return stream_lib.TrainBatches(
        m, plan, seed=3, streams=streams, process_index=0, process_count=1
    )


def test_each_stages_mixture_matches_its_weights_within_2_points_over_10k_documents(tmp_path):
    m = _two_datasets(tmp_path, max_len=2)
    c = _config()
    c.stages = (
        dict(steps=300, weights=dict(a=0.7, b=0.3), seq_len=16, batch_size=12),
        dict(steps=300, weights=dict(a=0.25, b=0.75), seq_len=32, batch_size=6),
    )
    plan = stages.build(c)
    batches = _stream(m, plan)
    per_stage = [list(batch_rows(next(batches) for _ in range(s.steps))) for s in plan.stages]
    for rows, want in zip(per_stage, (0.7, 0.25), strict=True):
        # A document starts where an input is BOS; the target there is its first id, the tag.
        tags = np.concatenate([r["targets"][r["inputs"] == BOS] for r in rows])
        assert len(tags) >= 10_000
        share = np.mean(tags == 3)
        assert abs(share - want) < 0.02, (share, len(tags))


def test_stream_resumes_exactly_mid_stage_and_across_the_boundary_losing_no_document(data):
    m = data
    c = _config()
    c.stages = STAGES
    plan = stages.build(c)
    straight = [next(it) for it in [_stream(m, plan, streams=2)] for _ in range(8)]
    for cut in (2, 4, 6):  # mid stage 0, exactly at the boundary, mid stage 1
        first = _stream(m, plan, streams=2)
        head = [next(first) for _ in range(cut)]
        second = _stream(m, plan, streams=2)
        second.set_state(json.loads(json.dumps(first.get_state())))
        for a, b in zip(straight, head + [next(second) for _ in range(8 - cut)], strict=True):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Row shapes follow the stage; the documents of each stream come out whole, in order,
    # across the change of length (a document split at the boundary continues at once).
    assert [b["inputs"].shape for b in straight] == [(2, 16)] * 4 + [(4, 32)] * 4
    docs = list(lane_documents(straight, streams=2))
    assert all(y[-1] == EOS and x[0] == BOS for x, y in docs) and len(docs) > 20


def test_bad_stage_plans_are_one_sentence_errors():
    cases = [
        (dict(steps=0), "stages[0].steps=0 must be a positive whole number."),
        (dict(steps=2.5), "stages[0].steps=2.5 must be a positive whole number."),
        (dict(steps=2, tokens=9), "stages[0] needs exactly one budget"),
        (dict(steps=2, seq_len=64), "stages[0].seq_len=64 exceeds model.max_seq_len=32."),
        (dict(steps=2, batch_size=3), "must be a multiple of the micro-batch"),
        (dict(steps=2, weights=dict(c=1.0)), "stages[0].weights names 'c'"),
        (dict(steps=2, lr=dict(decay="step")), "stages[0].lr.decay='step' must be one of"),
        (dict(steps=2, sq_len=4), "stages[0].sq_len is not a stage setting"),
    ]
    for spec, message in cases:
        c = _config()
        c.stages = (spec,)
        with pytest.raises(ConfigError, match=None) as e:
            stages.build(c)
        assert message in str(e.value) and "\n" not in str(e.value)
    c = _config(steps=10)
    c.stages = (dict(steps=2),)
    with pytest.raises(ConfigError, match="train.steps=10 and config.stages"):
        stages.build(c)


# --------------------------------------------------------------------------- whole runs


def _run(config, manifest, workdir, stop_at=None, tokenizer=None):
    """Trains (or resumes) in `workdir`; returns the trainer (closed) and its summary."""
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    setup = train.Setup(run_spec.build(config), VOCAB, mesh)
    with pytest.MonkeyPatch.context() as mp:
        # A stop at `stop_at` takes the preemption path (save, then return), without a signal.
        mp.setattr(loop.Trainer, "_should_stop", lambda self: self.step == stop_at)
        trainer = loop.Trainer(setup, str(workdir), manifest, tokenizer)
        try:
            summary = trainer.train()
        finally:
            trainer.close()
            trainer.out.close()
    return trainer, summary


def _staged_config(optimizer):
    c = _config()
    c.optim.name = optimizer
    c.stages = STAGES
    return c


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """Uninterrupted runs of STAGES, by optimizer (run once each, shared by the tests)."""
    runs = {}

    def get(optimizer):
        if optimizer not in runs:
            workdir = tmp_path_factory.mktemp(f"straight_{optimizer}")
            trainer, summary = _run(_staged_config(optimizer), data, workdir)
            runs[optimizer] = (trainer, summary, workdir)
        return runs[optimizer]

    return get


def _logged(workdir, key):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if key in r:
                out[r["step"]] = r[key]
    return out


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_mid_stage_and_at_the_boundary_is_bitwise_and_compiles_once_per_shape(
    optimizer, data, straight, tmp_path
):
    c = _staged_config(optimizer)
    plan = stages.build(c)
    straight, summary, workdir = straight(optimizer)
    assert summary["final_step"] == 8
    # One step program per stage shape: 2 x 16 in one micro-batch, then 4 x 32 in two of 2
    # rows (and RoPE theta 4e4), each compiled once although the run resumed three times.
    assert straight.setup.programs == [(2, 16, 1), (4, 32, 2)]
    losses = _logged(workdir, "train/loss")
    assert len(set(losses.values())) == 8
    # The logged learning rate is the plan's at every step (warmup, hold, WSD cool-down).
    lr = _logged(workdir, "train/lr")
    np.testing.assert_allclose(
        [lr[n + 1] for n in range(8)], [float(plan.schedule(n)) for n in range(8)], rtol=1e-7
    )
    assert lr[8] == pytest.approx(0.1 * c.optim.lr)
    assert _logged(workdir, "train/stage") == {s: int(s > 4) for s in range(1, 9)}
    assert _logged(workdir, "train/seq_len")[5] == 32
    # The held-out loss is reported at the long length, by the model with the extended RoPE.
    setup, params = straight.setup, straight.state["params"]
    extended = setup.graphdef_for(plan.stages[1])
    assert nnx.merge(extended, params).cfg.rope_theta == 40_000.0
    sets = train.eval_sets(setup, data)
    at_new = train.evaluate(setup, setup.jit_eval_step(plan.stages[1]), params, data, sets)["loss"]
    at_old = train.evaluate(setup, setup.jit_eval_step(plan.stages[0]), params, data, sets)["loss"]
    final = _logged(workdir, "eval/loss")[8]
    assert final == at_new != at_old and setup.plan.max_seq_len == 32
    # Evaluation tools (trained.load_trained) load a checkpoint with its stage's RoPE.
    for step, theta in ((4, c.model.rope_theta), (5, 40_000.0), (8, 40_000.0)):
        trained.use_model_of_step(setup, step)
        assert (
            nnx.merge(setup.graphdef, params).cfg.rope_theta == theta == setup.model_cfg.rope_theta
        )

    # Stopped mid stage 0, exactly at the boundary and mid stage 1, each time resumed.
    resumed = tmp_path / "resumed"
    for stop in (3, 4, 6):
        _, s = _run(c, data, resumed, stop_at=stop)
        assert s["preempted"] and s["final_step"] == stop
    last, _ = _run(c, data, resumed)
    assert _logged(resumed, "train/loss") == losses  # bitwise: floats from the same bits
    _assert_same_params(straight.state["params"], last.state["params"])


@pytest.mark.slow
def test_a_cool_down_branched_from_a_stable_checkpoint_equals_the_planned_one(
    data, straight, tmp_path
):
    planned, _, planned_dir = straight("adamw")  # STAGES: warmup, hold, then a WSD cool-down
    # A run that only holds the learning rate, never planned to decay: its checkpoint at step 4
    # (the planned run's boundary) is the branch point.
    stable = _config()
    stable.stages = ({**STAGES[0], "steps": 7},)
    _run(stable, data, tmp_path / "stable", stop_at=4)
    branch = _staged_config("adamw")
    branch.init_from = f"ckpt:{tmp_path / 'stable' / 'checkpoints' / '4'}"
    branch.branch = True
    branched, summary = _run(branch, data, tmp_path / "branched")
    assert summary["start_step"] == 4
    planned_losses = _logged(planned_dir, "train/loss")
    branched_losses = _logged(tmp_path / "branched", "train/loss")
    assert branched_losses == {s: planned_losses[s] for s in (5, 6, 7, 8)}
    _assert_same_params(planned.state["params"], branched.state["params"])


@pytest.mark.slow
def test_compile_tool_plans_exactly_the_programs_the_run_compiled(straight):
    """tools/compile.py's programs (`aot.compile_run`, through the TPU compiler) are the shapes
    the loop compiled in a real run of the same config: one per distinct stage shape and RoPE."""
    from jaxlm import aot

    trainer, _, _ = straight("adamw")
    reports = aot.compile_run(_staged_config("adamw"), "v5e-1", VOCAB, with_cost=False)
    planned = [(r.batch_size, r.seq_len, r.grad_accum) for r in reports]
    assert planned == trainer.setup.programs == [(2, 16, 1), (4, 32, 2)]
    assert [r.stage for r in reports] == ["stage 0 (short)", "stage 1 (long)"]
    assert all(r.memory["total"] > 0 for r in reports)


@pytest.mark.slow
def test_fim_with_stages_trains_and_resumes_bitwise(data, straight, tmp_path):
    """FIM rewrites documents in the one stream every run reads, stages or not: a staged FIM
    run trains on rearranged documents and resumes bitwise, mid stage and at the boundary."""
    c = _staged_config("adamw")
    c.objective = "fim"
    tokenizer = FakeTokenizer("fim", vocab_size=VOCAB)
    whole, _ = _run(c, data, tmp_path / "whole", tokenizer=tokenizer)
    assert whole.batches.iterators[0].doc_transform is not None
    causal = _logged(straight("adamw")[2], "train/loss")
    fim = _logged(tmp_path / "whole", "train/loss")
    assert len(fim) == 8 and fim[1] != causal[1], "the same run on rearranged documents"
    for stop in (3, 4):
        _run(c, data, tmp_path / "cut", stop_at=stop, tokenizer=tokenizer)
    resumed, _ = _run(c, data, tmp_path / "cut", tokenizer=tokenizer)
    assert _logged(tmp_path / "cut", "train/loss") == fim
    _assert_same_params(whole.state["params"], resumed.state["params"])
