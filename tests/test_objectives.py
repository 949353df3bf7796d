"""Objectives beyond next-token (jaxlm/objectives.py): causal runs are unchanged bit for bit;
masked and prefix attention see exactly what they should; FIM rearranges without losing or
splitting anything; every objective resumes bitwise on the 8-device fsdp mesh."""

import json
import os
import platform
import sysconfig

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxlm import attention, loop, objectives, sharding, train
from jaxlm import model as model_lib
from jaxlm import spec as run_spec
from jaxlm.data import stream
from jaxlm.data import tokenizer as tokenizer_lib
from tests.helpers import (
    BOS,
    PAD,
    FakeTokenizer,
    synthetic_docs,
    tiny_config,
    write_manifest,
)

# The special ids of FakeTokenizer's 1000 pieces: past the synthetic documents' range.
MASK, FIM_PRE, FIM_MID, FIM_SUF = 998, 997, 998, 999


def _objective(name: str, **options) -> objectives.Objective:
    config = tiny_config()
    config.objective = name
    config.objectives.update(options)
    return objectives.Objective.build(config, FakeTokenizer(name))


def _synthetic_manifest(root) -> dict:
    rng = np.random.RandomState(0)
    return write_manifest(
        root,
        {"a": {"train": synthetic_docs(rng, 60, 5, 30), "val": synthetic_docs(rng, 10, 5, 30)}},
    )


# --------------------------------------------------------------------------- must-show 1

# The train losses of 6 steps and the held-out loss after them (the loop below), as float.hex.
# Recorded with the stream's one packing lane per row (issue 26) on the 2-core Intel Xeon VM
# (AVX-512 with FP16) of 2026-12-08; the recordings before it read rows packed end to end
# (e3ba065), the single-stage grain stream and optax's schedule (309f6ba, 756db8c). XLA:CPU compiles
# for the host's microarchitecture, so another CPU rounds differently: it is held to the values
# within 1e-5, not to their bits.
RECORDED = {  # a substring of /proc/cpuinfo's model name -> (train losses, held-out loss)
    "Intel(R) Xeon(R)": (
        [
            "0x1.b9c3340000000p+2",
            "0x1.b6d4480000000p+2",
            "0x1.b76c960000000p+2",
            "0x1.b3ce300000000p+2",
            "0x1.b3d9a80000000p+2",
            "0x1.b1cb140000000p+2",
        ],
        "0x1.b2e44ee4a101ap+2",
    ),
}


def _recording_of_this_cpu() -> list[str] | None:
    """The losses recorded on a CPU like this one (x86-64 with AVX-512 and the same vendor
    line), or None: another CPU is held to the values within 1e-5, not to their bits."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None
    if platform.machine() != "x86_64" or " avx512f" not in info:
        return None
    model = next((line for line in info.splitlines() if line.startswith("model name")), "")
    for name, (train_losses, eval_loss) in RECORDED.items():
        if name in model:
            return train_losses + [eval_loss]
    return None


def test_causal_run_losses_are_bitwise_those_recorded(tmp_path):
    m = _synthetic_manifest(tmp_path)
    config = tiny_config()
    assert config.objective == "causal"
    config.train.steps = 6
    config.data.datasets = {"a": dict(paths="-", weight=1.0)}
    spec = run_spec.build(config)
    objective = objectives.Objective.build(config)
    mesh = sharding.make_mesh((1, -1, 1), jax.devices()[:1])
    setup = train.Setup(spec, vocab_size=1000, mesh=mesh)
    state, step = setup.init_state(), setup.jit_train_step()
    batches = stream.training_batches(spec, m, 0, 1, 2, objective.doc_transform())
    losses = []
    for _ in range(6):
        state, metrics = step(state, sharding.host_to_global(next(batches), setup.mesh))
        losses.append(float(metrics["loss"]).hex())
    sets = train.eval_sets(setup, m)
    result = train.evaluate(setup, setup.jit_eval_step(), state["params"], m, sets, objective)
    found = losses + [float(result["loss"]).hex()]
    recorded = _recording_of_this_cpu()
    if recorded is not None:
        assert found == recorded
    else:
        xeon_train, xeon_eval = RECORDED["Intel(R) Xeon(R)"]
        np.testing.assert_allclose(
            [float.fromhex(h) for h in found],
            [float.fromhex(h) for h in xeon_train + [xeon_eval]],
            rtol=1e-5,
        )


# --------------------------------------------------------------------------- must-show 2: masks

L = 23  # prime: a swapped axis cannot pass by accident


@pytest.fixture(scope="module")
def forward():
    """A jitted forward of a tiny random model: (tokens, segment_ids, prefix) -> logits."""
    cfg = model_lib.ModelConfig.from_config(tiny_config().model, 61)
    model = model_lib.create(cfg, seed=1)
    graphdef, params = model_lib.nnx.split(model)

    @jax.jit
    def run(params, tokens, segment_ids, prefix):
        m = model_lib.nnx.merge(graphdef, params)
        positions = np.broadcast_to(np.arange(L, dtype=np.int32), tokens.shape)
        return m(tokens, positions, segment_ids, prefix=prefix)

    return lambda tokens, seg, prefix: np.asarray(run(params, tokens, seg, prefix))


def _changed(forward, tokens, seg, prefix, at):
    """Per position (L,), whether changing the token `at` changes that position's logits."""
    other = tokens.copy()
    other[0, at] = (other[0, at] + 7) % 61
    a, b = forward(tokens, seg, prefix), forward(other, seg, prefix)
    return np.any(a[0] != b[0], axis=-1)


def test_masked_attention_sees_both_ways_within_a_document_and_never_across(forward):
    rng = np.random.RandomState(0)
    tokens = rng.randint(4, 61, (1, L)).astype(np.int32)
    seg = np.array([[1] * 9 + [2] * 11 + [0] * 3], np.int32)  # two documents, then padding
    prefix = (seg > 0).astype(np.int32)  # what the masked objective sends
    changed = _changed(forward, tokens, seg, prefix, at=6)
    assert changed[:9].all()  # every position of its document, earlier ones included
    assert not changed[9:].any()  # never the next document, nor padding
    changed = _changed(forward, tokens, seg, prefix, at=15)
    assert changed[9:20].all() and not changed[:9].any() and not changed[20:].any()


def test_prefix_attention_is_bidirectional_in_the_prefix_and_causal_after(forward):
    rng = np.random.RandomState(1)
    tokens = rng.randint(4, 61, (1, L)).astype(np.int32)
    seg = np.array([[1] * 13 + [2] * 10], np.int32)
    prefix = np.zeros((1, L), np.int32)
    prefix[0, :5] = 1  # document 1: prefix of 5
    prefix[0, 13:16] = 1  # document 2: prefix of 3
    changed = _changed(forward, tokens, seg, prefix, at=4)  # the prefix's last token
    assert changed[:13].all() and not changed[13:].any()  # its whole document sees it
    changed = _changed(forward, tokens, seg, prefix, at=8)  # after the prefix: causal
    assert not changed[:8].any() and changed[8:13].all() and not changed[13:].any()
    changed = _changed(forward, tokens, seg, prefix, at=14)
    assert not changed[:13].any() and changed[13:].all()


def test_non_causal_masks_take_the_xla_path_on_a_splash_model():
    """The model sends no segment ids with a non-causal mask; splash then runs XLA on it."""
    rng = np.random.RandomState(2)
    q, k, v = (rng.randn(1, 128, 2, 8).astype(np.float32) for _ in range(3))  # a splash length
    seg = np.ones((1, 128), np.int32)
    mask = model_lib.attention_mask(seg, seg, prefix=seg)  # bidirectional
    xla = attention.attend(q, k, v, mask, None, "xla")
    np.testing.assert_array_equal(attention.attend(q, k, v, mask, None, "splash"), xla)
    causal = attention.attend(q, k, v, model_lib.attention_mask(seg, seg), None, "xla")
    assert not np.allclose(causal, xla)  # the mask did reach the kernel


# --------------------------------------------------------------------------- the batch rewrites


def _packed(rows: int, length: int, seed: int = 0) -> dict:
    """Packed rows of the pipeline's contract: documents [BOS] + ids, then padding."""
    rng = np.random.RandomState(seed)
    inputs = np.zeros((rows, length), np.int32)
    seg = np.zeros((rows, length), np.int32)
    for r in range(rows):
        at, s = 0, 1
        while (n := min(rng.randint(2, 40), length - 8 - at)) >= 2:  # then some padding
            inputs[r, at : at + n] = [BOS, *rng.randint(100, 997, n - 1)]
            seg[r, at : at + n] = s
            at, s = at + n, s + 1
    inputs[seg == 0] = PAD
    positions = np.zeros_like(seg)
    for r in range(rows):
        for start, end in objectives._segments(seg[r]):
            positions[r, start:end] = np.arange(end - start)
    targets = np.roll(inputs, -1, axis=1)
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": seg,
        "positions": positions,
        "loss_mask": (seg > 0).astype(np.float32),
    }


def test_masking_follows_the_80_10_10_rule_on_the_configured_share():
    batch = _packed(64, 257)
    out = _objective("masked", mask_rate=0.15).apply(batch, step=3)
    chosen = out["loss_mask"] > 0
    candidates = (batch["segment_ids"] > 0) & (batch["inputs"] != BOS)
    assert not (chosen & ~candidates).any()  # never BOS, never padding
    assert abs(chosen.sum() / candidates.sum() - 0.15) < 0.01
    np.testing.assert_array_equal(out["targets"], batch["inputs"])  # predict the original
    kept = out["inputs"] == batch["inputs"]
    assert kept[~chosen].all()  # nothing else changes
    masked = (out["inputs"] == MASK)[chosen].mean()
    replaced = (~kept & (out["inputs"] != MASK))[chosen].mean()
    assert abs(masked - 0.8) < 0.02 and abs(replaced - 0.1) < 0.015
    np.testing.assert_array_equal(out["prefix"], batch["segment_ids"] > 0)


def test_choices_depend_on_seed_step_and_global_row_only():
    batch, objective = _packed(8, 101), _objective("masked")
    whole = objective.apply(batch, step=5)
    np.testing.assert_array_equal(whole["inputs"], objective.apply(batch, step=5)["inputs"])
    # A host holding rows 4..7 (row_offset 4) makes the same choices as one holding all rows.
    half = objective.apply({k: v[4:] for k, v in batch.items()}, step=5, row_offset=4)
    np.testing.assert_array_equal(half["inputs"], whole["inputs"][4:])
    assert (objective.apply(batch, step=6)["inputs"] != whole["inputs"]).any()
    held_out = objective.apply(batch, step=5, evaluation=True)
    assert (held_out["inputs"] != whole["inputs"]).any()


def test_whole_word_masking_chooses_all_pieces_of_a_word_or_none():
    config = tiny_config()
    config.objective = "masked"
    config.objectives.whole_word = True

    class Words(FakeTokenizer):
        def id_to_piece(self, i):  # even ids start a word ("▁ab"), odd ones continue it ("cd")
            return "\u2581ab" if i % 2 == 0 else "cd"

    objective = objectives.Objective.build(config, Words("masked"))
    batch = _packed(16, 211, seed=4)
    chosen = objective.apply(batch, step=0)["loss_mask"] > 0
    continues = (batch["inputs"] % 2 == 1) & (batch["segment_ids"] > 0)
    continues[:, 0] = False
    continues[:, 1:] &= (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]) & (
        batch["inputs"][:, :-1] != BOS
    )
    # A continuing piece is chosen exactly when the piece before it is.
    assert continues.sum() > 100 and chosen.sum() > 50
    np.testing.assert_array_equal(chosen[:, 1:][continues[:, 1:]], chosen[:, :-1][continues[:, 1:]])


@pytest.mark.parametrize("fraction", [0.0, 0.3])
def test_prefix_split_marks_a_leading_prefix_and_scores_only_what_follows(fraction):
    batch = _packed(8, 97, seed=5)
    out = _objective("prefix", prefix_fraction=fraction).apply(batch, step=1)
    splits = []
    for r in range(8):
        for start, end in objectives._segments(batch["segment_ids"][r]):
            k = int(out["prefix"][r, start:end].sum())
            splits.append(k)
            assert 1 <= k <= end - start - 1
            assert out["prefix"][r, start : start + k].all()  # a leading run
            expected = np.r_[np.zeros(k - 1), np.ones(end - start - k + 1)]
            np.testing.assert_array_equal(out["loss_mask"][r, start:end], expected)
            if fraction:
                assert k == min(end - start - 1, max(1, round(fraction * (end - start))))
    assert fraction or len(set(splits)) > 5  # random splits vary
    assert (out["loss_mask"][batch["segment_ids"] == 0] == 0).all()


# --------------------------------------------------------------------------- FIM

STDLIB = sysconfig.get_paths()["stdlib"]
UNICODE = "# naïve café — 日本語 ✓ ünïcödé\n"  # never in the tokenizer sample: byte fallback


@pytest.fixture(scope="module")
def fim_tokenizer(tmp_path_factory):
    """A small code-safe BPE with the FIM sentinels, trained on real standard-library text."""
    config = tiny_config()
    config.objective = "fim"
    config.tokenizer.vocab_size = 400
    texts = [open(os.path.join(STDLIB, "json", f)).read() for f in ("decoder.py", "encoder.py")]
    path = str(tmp_path_factory.mktemp("fim") / "tok.model")
    tok = tokenizer_lib.train_tokenizer(texts, objectives.tokenizer_config(config), path)
    return config, tok


def test_fim_is_a_permutation_plus_sentinels_that_decodes_back_to_the_document(fim_tokenizer):
    config, tok = fim_tokenizer
    config.objectives.fim_rate, config.objectives.fim_spm_rate = 1.0, 0.5
    fim = objectives.Objective.build(config, tok).doc_transform()
    sentinels = [tok.piece_to_id(p) for p in objectives.FIM_PIECES]
    pre_id, mid_id, suf_id = sentinels
    text = open(os.path.join(STDLIB, "json", "scanner.py")).read()[:1500]
    text = text[:700] + UNICODE * 3 + text[700:]
    ids = np.array(tok.encode(text) + [tok.eos_id], np.int32)
    assert any(objectives._continuation_byte(tok.id_to_piece(i)) for i in ids)
    orders = set()
    for i in range(200):
        out = fim(ids, (0, i))
        assert out[-1] == tok.eos_id and out[0] == pre_id
        body = [t for t in out[:-1] if t not in sentinels]
        assert sorted(body) == sorted(ids[:-1].tolist())  # nothing lost, nothing added
        assert sorted(t for t in out if t in sentinels) == sorted(sentinels)
        seq = out[:-1].tolist()
        s, m = seq.index(suf_id), seq.index(mid_id)
        if s == 1:  # SPM: <pre> <suf> suffix <mid> prefix middle
            orders.add("spm")
            suffix, rest = seq[2:m], seq[m + 1 :]
            parts = [rest, suffix]  # prefix+middle, then suffix: the document's order
        else:  # PSM: <pre> prefix <suf> suffix <mid> middle
            orders.add("psm")
            parts = [seq[1:s], seq[m + 1 :], seq[s + 1 : m]]
        assert sum(parts, []) == ids[:-1].tolist()
        # Every part is whole characters: decoding the parts one by one gives the text back.
        assert "".join(tok.decode(p) for p in parts) == text
        # decode -> re-encode: the sentinels come back as themselves, the text as itself.
        again = tok.encode(tok.decode(out[:1]) + "".join(tok.decode(p) for p in parts))
        assert tok.decode(again[1:]) == text and again[0] == pre_id
    assert orders == {"psm", "spm"}


def test_fim_evaluation_scores_the_middle_span_and_its_eos_only():
    objective = _objective("fim")
    doc = [BOS, FIM_PRE, 11, 12, FIM_SUF, 13, FIM_MID, 14, 15]  # inputs of one PSM document
    inputs = np.array([doc + doc[:5] + [0, 0]], np.int32)  # a second one cut by the row's end
    seg = np.array([[1] * 9 + [2] * 5 + [0, 0]], np.int32)
    batch = {"inputs": inputs, "segment_ids": seg, "loss_mask": (seg > 0).astype(np.float32)}
    mask = objective.apply(batch, step=0, evaluation=True)["loss_mask"]
    # Targets of positions 6..8 are 14, 15, EOS: the middle and the end that closes it.
    np.testing.assert_array_equal(mask[0], [0] * 6 + [1] * 3 + [0] * 7)
    assert objective.apply(batch, step=0) is batch  # training scores every token


# --------------------------------------------------------------------------- must-show 5


class _StopAt(loop.Trainer):
    """A trainer that is told to stop (as by SIGTERM) once it reaches `stop_at`."""

    stop_at = 0

    def _should_stop(self):
        return 0 < self.stop_at <= self.step or super()._should_stop()


def _train(setup, workdir, manifest, name, stop_at=0):
    _StopAt.stop_at = stop_at
    os.makedirs(workdir, exist_ok=True)
    trainer = _StopAt(setup, str(workdir), manifest, FakeTokenizer(name))
    try:
        trainer.train()
    finally:
        trainer.close()
        trainer.out.close()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    return losses, jax.device_get(trainer.state["params"])


def _resume_config(name: str) -> ml_collections.ConfigDict:
    config = tiny_config()
    config.objective = name
    config.train.steps, config.train.log_every = 6, 1
    config.checkpoint.every, config.checkpoint.async_save = 3, False
    config.eval.every, config.eval.next_line_examples = 0, 0
    config.logging.tensorboard = False
    return config


@pytest.fixture(scope="module")
def fsdp_setup():
    """The 8-device fsdp Setup of an objective, with steps and initial state compiled once for
    every run (masked and prefix batches have the same structure: one program)."""
    first = train.Setup(
        run_spec.build(_resume_config("masked")), 1000, sharding.make_mesh((1, -1, 1))
    )
    step, eval_step, init = first.jit_train_step(), first.jit_eval_step(), first.init_state()

    def of(name: str) -> train.Setup:
        setup = train.Setup(run_spec.build(_resume_config(name)), 1000, first.mesh)
        setup.jit_train_step = lambda stage=None: step
        setup.jit_eval_step = lambda stage=None: eval_step
        setup.init_state = lambda: jax.tree.map(jnp.copy, init)  # the step donates its state
        return setup

    return of


@pytest.mark.slow
@pytest.mark.parametrize("name", ["masked", "prefix"])
def test_each_objective_resumes_bitwise_on_the_8_device_fsdp_mesh(name, tmp_path, fsdp_setup):
    rng = np.random.RandomState(0)
    docs = {"train": synthetic_docs(rng, 80, 5, 30), "val": synthetic_docs(rng, 10, 5, 30)}
    manifest = write_manifest(tmp_path, {"stdlib": docs})
    setup = fsdp_setup(name)
    assert dict(setup.mesh.shape)["fsdp"] == 8

    whole, whole_params = _train(setup, tmp_path / "whole", manifest, name)
    first, _ = _train(setup, tmp_path / "cut", manifest, name, stop_at=3)
    resumed, resumed_params = _train(setup, tmp_path / "cut", manifest, name)
    assert len(whole) == 6 and first == whole[:3]
    assert resumed == whole  # metrics.jsonl of the interrupted run: steps 1-3, then 4-6
    jax.tree.map(np.testing.assert_array_equal, resumed_params, whole_params)


def test_fim_stream_resumes_exactly_and_rearranges_its_share_of_documents(tmp_path):
    """FIM changes only the documents (the step is the causal one, whose resume the e2e tests
    prove): its data stream must restore exactly, with the same rearrangements."""
    rng = np.random.RandomState(0)
    manifest = write_manifest(tmp_path, {"stdlib": {"train": synthetic_docs(rng, 80, 5, 30)}})
    fim = _objective("fim", fim_rate=0.5).doc_transform()
    config = tiny_config()
    config.objective = "fim"
    spec = run_spec.build(config)
    make = lambda: stream.training_batches(spec, manifest, 0, 1, 2, fim)  # noqa: E731
    whole = make()
    batches = [next(whole) for _ in range(12)]
    cut = make()
    for _ in range(5):
        next(cut)
    state = json.loads(json.dumps(cut.get_state()))  # as a checkpoint stores it
    resumed = make()
    resumed.set_state(state)
    for expected in batches[5:]:
        got = next(resumed)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
    # About half the documents start with <fim_prefix> after BOS.
    inputs = np.concatenate([b["inputs"] for b in batches])
    starts = np.flatnonzero(inputs.reshape(-1)[:-1] == BOS)
    share = np.mean(inputs.reshape(-1)[starts + 1] == FIM_PRE)
    assert 0.3 < share < 0.7


def test_held_out_metrics_of_each_objective_come_from_the_summed_eval_outputs():
    sums = {"nll": 30.0, "count": 12.0, "correct": 3.0, "spans": 4.0, "exact": 1.0}
    masked = _objective("masked").metrics(dict(sums, baseline_hits=1.0))
    assert masked == {"masked_accuracy": 0.25, "unigram_accuracy": 1 / 12}
    assert _objective("prefix").metrics(sums) == {"loss_after_prefix": 2.5}
    fim = _objective("fim").metrics(sums)
    assert fim == {"middle_token_accuracy": 0.25, "middle_exact_match": 0.25}
    assert _objective("causal").metrics(sums) == {}
