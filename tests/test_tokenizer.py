"""Tokenizer: exact round trips on Python source, fixed special ids, file hash, bounded sample."""

import hashlib
import itertools
import random

import ml_collections
import pytest

from jaxlm.data import sources, tokenizer
from jaxlm.errors import TokenizerMismatch


def _tok_cfg(**kw) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(
            path="",
            model_type="bpe",
            vocab_size=512,
            sample_bytes=1_000_000,
            byte_fallback=True,
            code_safe=True,
        )
    )
    cfg.update(kw)
    return cfg


def _stdlib_texts(every: int, offset: int, limit: int) -> list[str]:
    out = []
    for f in sources.stdlib_files()[offset::every]:
        with open(f.path, "rb") as fh:
            out.append(fh.read().decode("utf-8", "replace"))
        if len(out) == limit:
            break
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tokenizer.Tokenizer:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return tokenizer.train_tokenizer(_stdlib_texts(7, 0, 200), _tok_cfg(), path)


def test_round_trip_is_exact_on_held_out_stdlib_code(tok):
    held_out = _stdlib_texts(7, 3, 150)  # files the tokenizer never saw
    assert sum(map(len, held_out)) > 500_000
    for text in held_out:
        assert tok.decode(tok.encode(text)) == text
    tricky = (
        "class A:\n\tdef f(self):\n\t\treturn  1   \n\n\n"  # tabs, runs of spaces, trailing
        "        x = '\u00e9\u4e2d\U0001f600'  # unseen chars go through byte fallback\n"
        "   \n\r\n\x0c\u00a0end"  # whitespace-only lines, CR, form feed, NBSP, no final newline
    )
    assert tok.decode(tok.encode(tricky)) == tricky
    assert tok.decode(tok.encode("  leading spaces")) == "  leading spaces"


def test_indentation_has_whole_tokens(tok):
    assert tok.encode("    ") == [tok._sp.piece_to_id("\u2581" * 4)]
    assert tok.encode("        ") == [tok._sp.piece_to_id("\u2581" * 8)]
    assert len(tok.encode("\n")) == 1


def test_special_ids_and_vocab(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 512
    ids = tok.encode("import os\n")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "import os\n"
    assert tok.encode_batch(["a = 1\n", "b = 2\n"]) == [
        tok.encode("a = 1\n"),
        tok.encode("b = 2\n"),
    ]
    info = tok.info()
    assert info["eos_id"] == 3 and info["vocab_size"] == 512 and info["sha256"] == tok.sha256


def test_sha256_is_the_model_file_hash(tok, tmp_path):
    with open(tok.path, "rb") as f:
        assert tok.sha256 == hashlib.sha256(f.read()).hexdigest()
    again = tokenizer.load(tok.path)
    assert again.sha256 == tok.sha256 and again.path == tok.path
    other = tokenizer.train_tokenizer(
        _stdlib_texts(11, 1, 40), _tok_cfg(vocab_size=384), str(tmp_path / "b.model")
    )
    assert other.sha256 != tok.sha256


def test_training_reads_at_most_sample_bytes(tmp_path):
    seen = 0

    def endless():
        nonlocal seen
        for i in itertools.count():
            text = f"def f{i}(x):\n    return x + {i}\n" * 50
            seen += len(text)
            yield text

    tok = tokenizer.train_tokenizer(
        endless(), _tok_cfg(vocab_size=300, sample_bytes=200_000), str(tmp_path / "t.model")
    )
    assert tok.vocab_size == 300
    assert seen < 200_000 + 5_000


@pytest.mark.parametrize("model_type", ["unigram", "char"])
def test_other_model_types_round_trip(model_type, tmp_path):
    texts = _stdlib_texts(13, 2, 40)
    tok = tokenizer.train_tokenizer(
        texts, _tok_cfg(model_type=model_type, vocab_size=400), str(tmp_path / "m.model")
    )
    for text in texts[:10]:
        assert tok.decode(tok.encode(text)) == text


def test_bad_model_type_is_rejected():
    with pytest.raises(ValueError, match="model_type"):
        tokenizer.trainer_options(_tok_cfg(model_type="wordpiece"))


def test_hash_sampler_is_bounded_and_order_independent():
    rng = random.Random(0)
    docs = [("x" * rng.randrange(1, 400)) + str(i) for i in range(500)]

    def sample(order):
        s = tokenizer.HashSampler(20_000)
        for d in order:
            s.add(d, int(hashlib.sha256(d.encode()).hexdigest()[:16], 16))
        return s

    a = sample(docs)
    b = sample(sorted(docs, key=lambda _: rng.random()))
    assert a.texts() == b.texts()
    assert a.bytes <= 20_000 and sum(len(t) for t in a.texts()) == a.bytes
    assert 20_000 - 500 < a.bytes  # nearly full: the longest fitting prefix by priority
    assert len(set(a.texts())) == len(a.texts()) < len(docs)
    # Beam combines samples of parts: merged, they equal one sampler over everything
    for parts in (2, 3, 7):
        merged = sample(docs[0::parts])
        for k in range(1, parts):
            merged.merge(sample(docs[k::parts]))
        assert merged.texts() == a.texts() and merged.bytes == a.bytes


def test_one_check_refuses_another_tokenizer_and_names_both():
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    tokenizer.check_same(a, None, "x", "y", "z")  # nothing recorded: nothing to compare
    tokenizer.check_same(a, "", "x", "y", "z")
    tokenizer.check_same(a, a, "x", "y", "z")
    tokenizer.check_same(a, {b, a}, "x", "y", "z")  # any of several (tokenizer.json or .model)
    with pytest.raises(TokenizerMismatch) as e:
        tokenizer.check_same(
            a, {c, b}, "runs/r/tokenizer.model", "checkpoint 5 was trained with", "copy it"
        )
    assert str(e.value) == (
        f"runs/r/tokenizer.model (tokenizer {a[:12]}) does not match the tokenizer checkpoint 5 "
        f"was trained with ({b[:12]} or {c[:12]}); copy it."
    )
