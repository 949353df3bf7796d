"""The passkey retrieval eval and its training drill (jaxlm/evaluate/retrieval.py)."""

import inspect
import json
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import model as model_lib
from jaxlm import validate
from jaxlm.errors import ConfigError
from jaxlm.evaluate import retrieval
from tests.helpers import one_sentence, tiny_config

TEXTS = [inspect.getsource(m) for m in (json.decoder, textwrap, re)]  # real text, ~60 KB


class CharTokenizer:
    """One id per character of the texts (+ BOS): every length is exact, decode is exact."""

    def __init__(self, texts):
        chars = sorted(
            set("".join(texts)) | set(retrieval.NEEDLE + retrieval.QUESTION + "0123456789")
        )
        self.ids = {c: i + 1 for i, c in enumerate(chars)}
        self.chars = {i: c for c, i in self.ids.items()}
        self.bos_id, self.vocab_size = 0, len(chars) + 1

    def encode(self, text):
        return [self.ids[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars.get(int(i), "") for i in ids)


TOK = CharTokenizer(TEXTS)
KEY_LINE = re.compile(r'^passkey = "KEY(\d{5})"\n', re.M)


def test_examples_plant_one_key_at_spread_depths_and_ask_for_it():
    examples = retrieval.build(TEXTS, TOK, length=499, n_examples=30, seed=3)
    assert examples == retrieval.build(TEXTS, TOK, length=499, n_examples=30, seed=3)
    assert examples != retrieval.build(TEXTS, TOK, length=499, n_examples=30, seed=4)
    for ex in examples:
        context, answer = TOK.decode(ex.context[1:]), TOK.decode(ex.answer)
        assert ex.context[0] == TOK.bos_id
        assert 499 - 80 <= len(ex.context) + len(ex.answer) <= 499  # lines are < 80 chars
        assert KEY_LINE.findall(context) == [answer]  # one needle: the answer's key
        assert context.endswith("\n" + retrieval.QUESTION) and re.fullmatch(r"\d{5}", answer)
        at = context.index("passkey = ")
        assert ex.depth == pytest.approx((at + 1) / len(ex.context))
    depths = [ex.depth for ex in examples]
    assert min(depths) < 0.2 and max(depths) > 0.8


def test_drill_plants_pairs_whose_answer_is_the_last_key_and_keeps_the_text():
    planter = retrieval.Planter.build(TOK, seed=0, per_1k=4.0, max_gap=200)
    ids = np.array(TOK.encode(TEXTS[1]) + [TOK.bos_id], np.int32)  # a document ends in EOS
    out = planter(ids, (7, 0, 3))
    np.testing.assert_array_equal(out, planter(ids, (7, 0, 3)))  # a function of its key
    assert not np.array_equal(out, planter(ids, (7, 0, 4)))
    assert out[-1] == ids[-1]
    text = TOK.decode(out[:-1])
    pair = r'^passkey = "KEY(\d{5})"\n(.*?)^assert passkey == "KEY(\d{5})"\n'
    pairs = re.findall(pair, text, re.M | re.S)
    assert len(pairs) >= 10
    for key, between, asked in pairs:
        assert key == asked and 8 <= len(between) <= 200 + 80  # to the next line start
    stripped = re.sub(r'^(passkey = |assert passkey == )"KEY\d{5}"\n', "", text, flags=re.M)
    assert stripped == TEXTS[1]


def test_exact_match_is_greedy_decoding_of_the_whole_answer():
    cfg = model_lib.ModelConfig.from_config(tiny_config().model, TOK.vocab_size)
    params = nnx.state(model_lib.create(cfg, seed=1), nnx.Param)
    graphdef = nnx.split(model_lib.abstract(cfg))[0]
    model = nnx.merge(graphdef, params)
    forward = jax.jit(lambda tokens: jax.nn.log_softmax(model(tokens)))  # causal: pad at the end
    logp_of = lambda ids: np.asarray(forward(jnp.array([ids + [0] * (60 - len(ids))])))[0]  # noqa: E731
    rng = np.random.default_rng(0)
    examples = []
    for i in range(6):
        context = [TOK.bos_id, *rng.integers(1, TOK.vocab_size, 23 + 5 * i).tolist()]
        answer = []
        for _ in range(3):  # the model's own greedy continuation
            answer.append(int(logp_of(context + answer)[len(context) + len(answer) - 1].argmax()))
        if i % 2:  # every other example: the last answer token is not the greedy one
            answer[-1] = (answer[-1] + 1) % TOK.vocab_size
        examples.append(retrieval.Example(tuple(context), tuple(answer), 0.5))
    result = retrieval.score(graphdef, params, examples, length=60, batch_size=4)
    assert result["accuracy"] == 0.5 and result["n"] == 6
    nll = []
    for ex in examples:
        logp = logp_of([*ex.context, *ex.answer[:-1]])
        nll += [-logp[len(ex.context) - 1 + j, t] for j, t in enumerate(ex.answer)]
    assert result["answer_nll"] == pytest.approx(np.mean(nll), rel=1e-5)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(retrieval_lengths="64,128"), "model.max_seq_len=64"),
        (dict(retrieval_lengths="64,x"), "eval.retrieval_lengths must be lengths"),
        (dict(objective="fim", passkeys_per_1k=2.0), "needs objective='causal'"),
    ],
)
def test_bad_retrieval_settings_are_one_sentence(overrides, words):
    c = tiny_config()
    for key, value in overrides.items():
        if key == "objective":
            c.objective = value
        elif key == "passkeys_per_1k":
            c.data.passkeys_per_1k = value
        else:
            c.eval[key] = value
    with pytest.raises(ConfigError) as e:
        validate.check_config(c)
    assert words in one_sentence(e)
