"""Zero-shot multiple-choice scoring: memorized answers score 100%, a fresh model scores chance,
packed scoring equals a plain forward pass, shared-context scoring equals one pass per choice,
and the next-line task is deterministic and correct."""

import json
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import sharding, train
from jaxlm import spec as run_spec
from jaxlm.errors import JaxlmError
from jaxlm.evaluate import choices, scoring, tasks
from tests.helpers import tiny_config

ALPHABET = "abcdefghijklmnopqrstuvwxyz \n"


class CharTokenizer:
    """One id per character; 0 pad, 1 BOS, 2 EOS. Vocab 31 (prime)."""

    bos_id, eos_id = 1, 2
    vocab_size = 3 + len(ALPHABET)

    def encode(self, text):
        return [3 + ALPHABET.index(ch) for ch in text]

    def decode(self, ids):
        return "".join(ALPHABET[i - 3] for i in ids if i >= 3)


TOK = CharTokenizer()
SEQ_LEN = 64  # scoring rows: three 18-token sequences fit in one


def random_task(n, seed, context_len=10, choice_len=8, n_choices=4):
    """Gold and distractors are drawn alike: only a model that learned the gold tells them apart."""
    rng = random.Random(seed)
    word = lambda k: "".join(rng.choice(ALPHABET[:26]) for _ in range(k))  # noqa: E731
    return [
        {
            "context": word(context_len),
            "choices": [word(choice_len) for _ in range(n_choices)],
            "gold": rng.randrange(n_choices),
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    config.train.batch_size = 16
    config.train.seq_len = 24
    config.train.steps = 60
    return train.Setup(
        run_spec.build(config), TOK.vocab_size, sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    )


def memorization_batch(examples, seq_len):
    """Each row is one example's BOS + context + gold choice, right-padded (segment 0)."""
    batch = {
        k: np.zeros((len(examples), seq_len), np.int32)
        for k in ("inputs", "targets", "segment_ids", "positions")
    }
    batch["loss_mask"] = np.zeros((len(examples), seq_len), np.float32)
    for r, ex in enumerate(examples):
        seq = [TOK.bos_id, *TOK.encode(ex["context"] + ex["choices"][ex["gold"]])]
        n = len(seq) - 1
        batch["inputs"][r, :n], batch["targets"][r, :n] = seq[:-1], seq[1:]
        batch["segment_ids"][r, :n], batch["positions"][r, :n] = 1, np.arange(n)
        batch["loss_mask"][r, :n] = 1.0
    return batch


@pytest.fixture(scope="module")
def memorizing_run(setup):
    """(fresh params, params after training on the gold answers, final loss, the task)."""
    examples = random_task(16, seed=1)
    batch = sharding.host_to_global(
        memorization_batch(examples, setup.config.train.seq_len), setup.mesh
    )
    state = setup.init_state()
    fresh = jax.tree.map(jnp.copy, state["params"])  # the step donates the state
    step = setup.jit_train_step()
    for _ in range(setup.config.train.steps):
        state, metrics = step(state, batch)
    return fresh, state["params"], float(metrics["loss"]), examples


def choice_sequences(examples, seq_len=SEQ_LEN):
    """Every (BOS + context + choice, choice length) of a task, the context cut as scoring does."""
    return [
        ([*context, *ids], len(ids))
        for context, conts in choices.encode_task(TOK, examples, seq_len)
        for ids in conts
    ]


def rows32(packed):
    """Packed rows zero-padded to the 32-row batch of `score`, so its compiled scorer is reused."""
    n = len(packed.rows["inputs"])
    return {
        k: np.concatenate([v, np.zeros((32 - n, *v.shape[1:]), v.dtype)])
        for k, v in packed.rows.items()
    }


def score(setup, params, examples):
    return choices.score_task(setup.graphdef, params, TOK, examples, seq_len=SEQ_LEN, batch_size=32)


def test_memorized_gold_choices_score_100_percent(setup, memorizing_run):
    fresh, trained, loss, examples = memorizing_run
    assert loss < 0.5, loss
    assert (
        score(setup, fresh, examples)["accuracy"] < 1.0
    )  # so 100% is learned, not the task's doing
    after = score(setup, trained, examples)
    assert after["accuracy"] == after["accuracy_per_token"] == after["accuracy_unnormalized"] == 1.0
    assert after["n"] == 16 and after["chance"] == 0.25


def test_fresh_model_scores_chance_within_three_sigma(setup, memorizing_run):
    result = score(setup, memorizing_run[0], random_task(300, seed=2))
    sigma = math.sqrt(0.25 * 0.75 / 300)
    assert abs(result["accuracy"] - 0.25) < 3 * sigma, result
    assert result["n"] == 300


def test_packed_scores_equal_a_plain_forward_pass_of_each_sequence(setup, memorizing_run):
    # A context longer than the row is cut from the left; packing must not leak between segments.
    params = memorizing_run[1]
    examples = random_task(3, seed=3, context_len=12, choice_len=5, n_choices=3)
    examples[1]["context"] = "x" * 70
    seqs = choice_sequences(examples)
    packed = scoring.pack(seqs, SEQ_LEN)
    assert packed.where[:, 1].max() > 0  # several sequences really share a row
    got = scoring.score_sequences(setup.graphdef, params, seqs, seq_len=SEQ_LEN, batch_size=32)
    np.testing.assert_array_equal(got.tokens, 5)

    # Reference: every sequence alone in its own right-padded row (causal, so padding is inert).
    seqs = []
    for ex in examples:
        context = TOK.encode(ex["context"])
        for choice in ex["choices"]:
            ids = TOK.encode(choice)
            seqs.append([TOK.bos_id, *context[max(0, len(context) + len(ids) - SEQ_LEN) :], *ids])
    inputs = np.zeros((len(seqs), SEQ_LEN), np.int32)
    for r, seq in enumerate(seqs):
        inputs[r, : len(seq) - 1] = seq[:-1]
    logp = jax.jit(lambda p, x: jax.nn.log_softmax(nnx.merge(setup.graphdef, p)(x)))(params, inputs)
    logp = np.asarray(logp)  # (N, L, V)
    expected = [
        sum(logp[r, t - 1, seq[t]] for t in range(len(seq) - 5, len(seq)))
        for r, seq in enumerate(seqs)
    ]
    np.testing.assert_allclose(got.logprob, expected, rtol=1e-5, atol=1e-5)
    greedy = [
        all(logp[r, t - 1].argmax() == seq[t] for t in range(len(seq) - 5, len(seq)))
        for r, seq in enumerate(seqs)
    ]
    np.testing.assert_array_equal(got.greedy, greedy)


def test_shared_context_scores_equal_one_pass_per_choice(setup, memorizing_run):
    """The KV-cache layout (context once, choices as continuations) against the packed one
    (context + choice per choice): same log-probabilities, token counts and accuracies, with
    contexts of many lengths, one-token choices, a variable number of choices and a cut context."""
    params = memorizing_run[1]
    examples = random_task(20, seed=11, context_len=9, choice_len=6)
    rng = random.Random(0)
    for i, ex in enumerate(examples):
        ex["context"] = ex["context"][: rng.randrange(0, 10)] + "q" * (i % 7)
        ex["choices"] = [c[: rng.randrange(1, 7)] for c in ex["choices"][: 2 + i % 3]]
        ex["gold"] %= len(ex["choices"])
    examples[3]["context"] = "y" * 90  # cut from the left to fit the row
    examples.extend(memorizing_run[3][:6])  # some the model knows: not every score is noise
    reference = scoring.score_sequences(
        setup.graphdef, params, choice_sequences(examples), seq_len=SEQ_LEN, batch_size=32
    )
    groups = choices.encode_task(TOK, examples, SEQ_LEN)
    shared = choices.score_continuations(  # two calls of two rows, several contexts per row
        setup.graphdef, params, groups, seq_len=SEQ_LEN, batch_size=2, max_segments=4
    )
    np.testing.assert_allclose(shared.logprob, reference.logprob, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(shared.tokens, reference.tokens)
    np.testing.assert_array_equal(shared.greedy, reference.greedy)
    assert reference.greedy.any()
    assert choices.accuracies(examples, shared.logprob, shared.tokens) == choices.accuracies(
        examples, reference.logprob, reference.tokens
    )


def test_scoring_split_over_eight_devices_equals_one_device(setup, memorizing_run):
    _, trained, _, examples = memorizing_run
    mesh = sharding.make_mesh((1, -1, 1))  # 8 fake devices, fsdp
    sharded_setup = train.Setup(run_spec.build(setup.config), TOK.vocab_size, mesh)
    sharded = jax.device_put(trained, sharded_setup.param_shardings)
    packed = scoring.pack(choice_sequences(random_task(8, seed=5)), SEQ_LEN)
    rows = rows32(packed)
    one = scoring.jitted_scorer(None)(
        setup.graphdef, trained, rows, num_segments=packed.num_segments
    )
    many = scoring.jitted_scorer(sharded_setup.mesh_rules)(
        setup.graphdef,
        sharded,
        jax.device_put(rows, sharding.batch_sharding(mesh)),
        num_segments=packed.num_segments,
    )
    result = choices.score_task(
        setup.graphdef,
        sharded,
        TOK,
        examples,
        seq_len=SEQ_LEN,
        batch_size=28,
        mesh_rules=sharded_setup.mesh_rules,
    )
    np.testing.assert_allclose(many[0], one[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(many[1], one[1])
    np.testing.assert_array_equal(many[2], one[2])
    assert result["accuracy"] == 1.0


def test_a_choice_longer_than_the_row_is_one_clear_error(setup):
    examples = [{"context": "ab", "choices": ["a" * 80, "b"], "gold": 0}]
    with pytest.raises(JaxlmError, match="example 0 choice 0 encodes to 80 tokens"):
        choices.score_task(setup.graphdef, None, TOK, examples, seq_len=SEQ_LEN, batch_size=4)


def test_task_round_trips_through_jsonl_and_bad_lines_name_their_line(tmp_path):
    examples = random_task(5, seed=4)
    path = str(tmp_path / "task.jsonl")
    tasks.write_task(path, examples)
    assert tasks.load_task(path) == examples
    with open(path, "a") as f:
        f.write(json.dumps({"context": "a", "choices": ["b", "c"], "gold": 2}) + "\n")
    with pytest.raises(
        JaxlmError, match=r"task.jsonl:6: 'gold' must be an integer index into the 2"
    ):
        tasks.load_task(path)
    with pytest.raises(JaxlmError, match="does not exist"):
        tasks.load_task(str(tmp_path / "missing.jsonl"))


# --------------------------------------------------------------------------- next-line task

SOURCE = [
    "\n".join(
        [
            f"def function_{f}_{i}(value):\n    result = value * {i} + {f}\n\n"
            f"    return result + {i}"
            for i in range(12)
        ]
    )
    for f in range(5)
]


def test_next_line_task_is_deterministic_and_gold_is_the_true_next_line():
    task = tasks.build_next_line_task(SOURCE, n_examples=40, seed=7, context_lines=3, n_choices=4)
    assert task == tasks.build_next_line_task(
        SOURCE, n_examples=40, seed=7, context_lines=3, n_choices=4
    )
    assert task != tasks.build_next_line_task(
        SOURCE, n_examples=40, seed=8, context_lines=3, n_choices=4
    )
    assert len(task) == 40
    golds = [ex["gold"] for ex in task]
    assert len(set(golds)) > 1  # the gold position is shuffled
    for ex in task:
        gold_line = ex["choices"][ex["gold"]]
        assert any(f"\n{ex['context']}{gold_line}\n" in f"\n{text}\n" for text in SOURCE)
        assert ex["context"].count("\n") == 3 and ex["context"].endswith("\n")
        stripped = [c.strip() for c in ex["choices"]]
        assert len(set(stripped)) == 4  # no distractor repeats the gold or another distractor
        context_lines = {line.strip() for line in ex["context"].split("\n")}
        indent = gold_line[: len(gold_line) - len(gold_line.lstrip())]
        for c in ex["choices"]:
            assert len(c.strip()) >= 8 and c.startswith(indent)
            assert c == gold_line or c.strip() not in context_lines


def test_next_line_task_on_too_little_text_is_one_clear_error():
    with pytest.raises(JaxlmError, match="only 1 distinct usable lines"):
        tasks.build_next_line_task(["x = 1\nvalue = compute()\n\n"], n_examples=5)


def test_heldout_texts_decode_val_records_and_the_task_file_is_reused(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    docs = ["\n".join(f"line number {w} of document {d}" for w in "abcdefghij") for d in "xy"]
    writer = ArrayRecordWriter(str(tmp_path / "val-0.arrayrecord"), "group_size:1")
    for doc in docs:
        writer.write(np.asarray(TOK.encode(doc) + [TOK.eos_id], "<i4").tobytes())
    writer.close()
    manifest = {
        "root": str(tmp_path),
        "datasets": {"code": {"val": {"shards": [{"path": "val-0.arrayrecord", "documents": 2}]}}},
    }
    assert list(tasks.heldout_texts(manifest, TOK.decode)) == docs

    path = str(tmp_path / "tasks" / "next_line.jsonl")
    built = tasks.ensure_next_line_task(
        path, tasks.heldout_texts(manifest, TOK.decode), n_examples=10, seed=0
    )
    assert tasks.ensure_next_line_task(path) == built  # read back, not rebuilt
