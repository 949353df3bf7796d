"""Hugging Face tokenizers: prepared records equal the tokenizers library's ids, our loader
tokenizes as transformers does, exported sentencepiece models load in transformers, and a
continued-pretraining run end to end with a base model's own tokenizer.

The text is real and on every machine: the Python language reference's prose (pydoc_data) and
the standard library's docstrings and source.
"""

import json
import os

import jax
import numpy as np
import pytest

from jaxlm import checkpoint as ckpt_lib
from jaxlm import sharding, train
from jaxlm import spec as run_spec
from jaxlm.convert import hf
from jaxlm.convert import init_from as warm_start
from jaxlm.data import hf_tokenizer, stream
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.files import file_sha256
from tests.helpers import (
    hf_logits,
    jaxlm_logits,
    make_hf_model,
    one_sentence,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_prose() -> str:
    """English prose with code in it that every CPython has: the language reference's topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


TRAIN_CHARS = 300_000  # the tokenizers below are trained on this much of the prose


# --------------------------------------------------------------------------- tokenizers


def _docstring_paragraphs() -> list[str]:
    """Long paragraphs of standard-library docstrings, in a fixed order, each once."""
    import importlib
    import inspect

    seen, out = set(), []
    for name in DOCUMENTED_MODULES:
        for attr, obj in sorted(vars(importlib.import_module(name)).items()):
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            for p in (inspect.getdoc(obj) or "").split("\n\n"):
                if len(p.strip()) > 200 and p.strip() not in seen:
                    seen.add(p.strip())
                    out.append(p.strip())
    return out


DOCUMENTED_MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "csv", "datetime", "decimal",
    "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "itertools",
    "json", "logging", "multiprocessing", "os", "pathlib", "pickle", "random", "re", "shutil",
    "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.request", "uuid", "xml.etree.ElementTree",
    "zipfile",
)  # fmt: skip


def real_documents(n=150):
    """Held-out real text: n paragraphs of the reference's prose the tokenizers were not
    trained on, n docstring paragraphs, Python source (whitespace) and edge cases."""
    import inspect
    import json as json_module

    prose = reference_prose()[TRAIN_CHARS:].split("\n\n")
    held_out = [p.strip() for p in prose if len(p.strip()) > 200][:n]
    docstrings = _docstring_paragraphs()[:n]
    assert len(held_out) == len(docstrings) == n, (len(held_out), len(docstrings))
    code = [inspect.getsource(json_module.decoder), inspect.getsource(json_module.encoder)]
    return (
        held_out + docstrings + code + ["", " leading space", "tabs\tand  double  spaces \n\n end "]
    )


def _train_spm(path, text):
    """A Llama-2-style sentencepiece BPE model: dummy prefix, byte fallback, <unk> <s> </s>."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n\n")),
        model_writer=buf,
        model_type="bpe",
        vocab_size=800,
        byte_fallback=True,
        add_dummy_prefix=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=0.9995,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(buf.getvalue())


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Tokenizers trained on the reference's prose: 'llama2' (sentencepiece tokenizer.model plus the
    tokenizer.json transformers converts it to) and 'llama3' (byte-level BPE tokenizer.json)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    text = reference_prose()[:TRAIN_CHARS]
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {"llama2": root / "llama2", "llama3": root / "llama3"}
    for d in dirs.values():
        d.mkdir()
    _train_spm(dirs["llama2"] / "tokenizer.model", text)

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        text.split("\n\n"),
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tok.save(str(dirs["llama3"] / "tokenizer.json"))
    json.dump(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "clean_up_tokenization_spaces": False,
        },
        open(dirs["llama3"] / "tokenizer_config.json", "w"),
    )
    return dirs


def llama2_json(tokenizer_dirs):
    """The Llama-2-style tokenizer.json, converted from tokenizer.model by transformers."""
    import transformers

    d = tokenizer_dirs["llama2"]
    if not (d / "tokenizer.json").exists():
        # (LlamaTokenizerFast: the converting class in transformers 4, an alias of it in 5)
        converted = transformers.LlamaTokenizerFast.from_pretrained(str(d))
        converted.save_pretrained(str(d))  # writes tokenizer.json + tokenizer_config.json
    return d / "tokenizer.json"


@pytest.fixture
def json_dispatch(monkeypatch):
    """Routes tokenizer.json files to HFTokenizer in jaxlm.data.tokenizer (in this process)
    until that module dispatches itself; harmless once it does."""
    from jaxlm.data import tokenizer

    load, cls_load = tokenizer.load, tokenizer.Tokenizer.load.__func__

    def pick(path, fallback):
        return (
            tokenizer_lib.HFTokenizer.load(path)
            if tokenizer_lib.is_tokenizer_json(path)
            else fallback(path)
        )

    monkeypatch.setattr(tokenizer, "load", lambda path: pick(path, load))
    monkeypatch.setattr(
        tokenizer.Tokenizer,
        "load",
        classmethod(lambda cls, path: pick(path, lambda p: cls_load(cls, p))),
    )


def library_encoder(path):
    """(encode, eos_id) of the tokenizer's own library: tokenizers or sentencepiece."""
    if str(path).endswith(".json"):
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(path))
        eos = tok.token_to_id("</s>")
        eos = tok.token_to_id("<|end_of_text|>") if eos is None else eos
        return (lambda text: tok.encode(text, add_special_tokens=False).ids), eos
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    return sp.encode, sp.eos_id()


@pytest.mark.parametrize("kind", ["llama2_model", "llama2_json", "llama3_json"])
def test_prepared_records_equal_the_tokenizer_library(
    kind, tokenizer_dirs, json_dispatch, tmp_path
):
    from jaxlm.data import records

    path = {
        "llama2_model": lambda: tokenizer_dirs["llama2"] / "tokenizer.model",
        "llama2_json": lambda: llama2_json(tokenizer_dirs),
        "llama3_json": lambda: tokenizer_dirs["llama3"] / "tokenizer.json",
    }[kind]()
    docs = real_documents()
    with records.Encoder(str(path), num_proc=1) as encoder:
        shards, _ = encoder.write_shards(docs, str(tmp_path), "s-{index:03d}.ar", 100)
    got = [r for s in shards for r in records.read_shard(str(tmp_path / s.path))]
    encode, eos = library_encoder(path)
    assert len(got) == len(docs)
    for doc, record in zip(docs, got, strict=True):
        assert record[-1] == eos
        assert record[:-1].tolist() == encode(doc), doc[:80]


@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_hf_tokenizer_matches_transformers(style, tokenizer_dirs):
    import transformers

    from jaxlm.data.tokenizer import HFTokenizer

    path = (
        llama2_json(tokenizer_dirs)
        if style == "llama2"
        else tokenizer_dirs[style] / "tokenizer.json"
    )
    ours = HFTokenizer.load(str(path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent))
    docs = real_documents(50)
    ids = ours.encode_batch(docs)
    assert ids == theirs(docs, add_special_tokens=False)["input_ids"]
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert [ours.decode(x) for x in ids] == theirs.batch_decode(ids, skip_special_tokens=True)
    if style == "llama3":  # byte-level BPE is lossless
        assert [ours.decode(x) for x in ids] == docs


@pytest.mark.parametrize("style", ["llama2", "jaxlm_code_safe"])
def test_exported_sentencepiece_tokenizer_loads_in_transformers(style, tokenizer_dirs, tmp_path):
    """transformers converts a sentencepiece .model itself; on prose it tokenizes as we do.
    (Not on code for code-safe models: its converter reads their whitespace pieces differently.)"""
    import transformers

    from configs import base
    from jaxlm.data import tokenizer as tokenizer_lib

    if style == "llama2":
        path = tokenizer_dirs["llama2"] / "tokenizer.model"
    else:
        tok_cfg = base.get_config().tokenizer
        tok_cfg.update(vocab_size=800, sample_bytes=300_000)
        text = reference_prose()[:TRAIN_CHARS]
        path = tmp_path / "jaxlm.model"
        tokenizer_lib.train_tokenizer([text], tok_cfg, str(path))
    ours = tokenizer_lib.Tokenizer.load(str(path))
    special = hf_tokenizer.write_for_transformers(str(path), str(tmp_path / "out"), 128)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert (special["bos_token_id"], special["eos_token_id"]) == (ours.bos_id, ours.eos_id)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id)
    prose = real_documents(100)[100:200]  # docstring paragraphs
    assert theirs(prose, add_special_tokens=False)["input_ids"] == ours.encode_batch(prose)


def test_tokenizer_json_is_recognised_by_content_and_needs_an_eos(tokenizer_dirs, tmp_path):
    from jaxlm.data.tokenizer import HFTokenizer, is_tokenizer_json
    from jaxlm.errors import JaxlmError

    src = tokenizer_dirs["llama3"] / "tokenizer.json"
    renamed = tmp_path / "tokenizer.model"  # data preparation may copy it under this name
    renamed.write_bytes(src.read_bytes())
    assert is_tokenizer_json(str(renamed))
    assert not is_tokenizer_json(str(tokenizer_dirs["llama2"] / "tokenizer.model"))
    tok = HFTokenizer.load(str(renamed))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, -1)
    assert tok.sha256 == file_sha256(str(src))
    spec = json.loads(src.read_text())
    spec["added_tokens"] = spec["added_tokens"][:1]
    del spec["model"]["vocab"]["<|end_of_text|>"]
    (tmp_path / "no_eos.json").write_text(json.dumps(spec))
    with pytest.raises(JaxlmError) as e:
        HFTokenizer.load(str(tmp_path / "no_eos.json"))
    assert "has none of the end-of-text tokens" in one_sentence(e)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow  # prepares data, compiles train + eval steps: ~40 s on a 2-core CPU
def test_continued_pretraining_end_to_end(tokenizer_dirs, json_dispatch, tmp_path):
    """Import a small HF Llama with its own tokenizer, prepare a domain corpus with that
    tokenizer, train, see held-out domain loss fall, export, and load the result in transformers."""
    import transformers

    from configs import continue_pretraining
    from jaxlm.data import manifest as manifest_lib
    from jaxlm.data import prepare
    from jaxlm.data import tokenizer as tokenizer_lib

    # A TinySolar-like base: Llama weights with tokenizer.model and tokenizer.json side by side.
    base = tmp_path / "base"
    tok_json = llama2_json(tokenizer_dirs)
    vocab = json.loads(tok_json.read_text())["model"]["vocab"].__len__()
    make_hf_model(
        base,
        seed=3,
        vocab=vocab,
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=96,
        initializer_range=0.02,
    )
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (base / name).write_bytes((tok_json.parent / name).read_bytes())
    domain = [p.strip() for p in reference_prose().split("\n\n") if len(p.strip()) > 200][:600]
    with open(tmp_path / "domain.jsonl", "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in domain)

    config = continue_pretraining.get_config(str(base))
    assert config.init_from == f"hf:{base}"
    assert config.tokenizer.path == str(base / "tokenizer.json")
    assert (config.model.d_model, config.model.head_dim, config.model.d_ff) == (48, 12, 96)
    config.data.datasets.domain.paths = str(tmp_path / "domain.jsonl")
    config.data.cache_dir, config.data.num_proc = str(tmp_path / "cache"), 1
    config.data.val_fraction = 0.1
    config.data.curation.quality.preset = "none"
    config.model.dtype = "float32"
    config.train.update(steps=40, batch_size=8, seq_len=64)
    config.eval.update(max_batches=4, batch_size=8)
    # The recipe's 5e-6 -> 5e-5 suits a pretrained model; a random tiny one needs more to move.
    config.optim.update(init_lr=3e-4, lr=3e-3, warmup_steps=5)
    config.checkpoint.async_save = False

    manifest_path = prepare.prepare(config.data, config.tokenizer, log=lambda s: None)
    manifest = manifest_lib.load(manifest_path)
    tok = tokenizer_lib.load(manifest_lib.tokenizer_path(manifest))
    assert manifest["tokenizer"]["sha256"] == file_sha256(str(base / "tokenizer.json"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (vocab, 1, 2)

    setup = train.Setup(
        run_spec.build(config), tok.vocab_size, sharding.make_mesh(config.mesh.shape)
    )
    state = setup.init_state()
    state["params"] = warm_start.load_params(
        config.init_from, setup, manifest["tokenizer"]["sha256"]
    )
    train_step, eval_step = setup.jit_train_step(), setup.jit_eval_step()
    sets = train.eval_sets(setup, manifest)
    before = train.evaluate(setup, eval_step, state["params"], manifest, sets)["loss"]
    it = stream.training_batches(setup.spec, manifest, 0, 1, 1)
    history = []
    for _ in range(config.train.steps):
        state, m = train_step(state, sharding.host_to_global(next(it), setup.mesh))
        history.append({k: float(v) for k, v in jax.device_get(m).items()})
    after = train.evaluate(setup, eval_step, state["params"], manifest, sets)["loss"]
    print(f"held-out domain loss {before:.3f} -> {after:.3f} after {len(history)} steps")
    assert after < before - 0.5, (before, after)
    lrs = [h["lr"] for h in history]
    # Warmup starts one step in (the first update never uses a zero rate): init + 1/W of the rise.
    warmup = config.optim.warmup_steps
    assert lrs[0] == pytest.approx(3e-4 + (3e-3 - 3e-4) / warmup) and max(lrs) == pytest.approx(
        3e-3
    )
    assert lrs[-1] < 0.01 * 3e-3  # cosine decay to zero
    assert all(np.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in history)

    workdir = tmp_path / "run"
    meta = {
        "config": json.loads(config.to_json_best_effort()),
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        "param_shapes": ckpt_lib.param_shapes(setup.abstract_state["params"]),
    }
    checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), config.checkpoint)
    checkpointer.save(config.train.steps, state, None, meta, force=True)
    checkpointer.close()
    out = tmp_path / "exported"
    hf.export_hf(str(workdir), str(out), progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = [tok.bos_id] + tok.encode(domain[-1])[:63]
    assert ids[1:] == hf_tok(domain[-1], add_special_tokens=False)["input_ids"][:63]
    params = jax.device_get(state["params"])
    diff = np.abs(hf_logits(model, [ids]) - jaxlm_logits(setup.model_cfg, params, [ids])).max()
    print(f"continued model: transformers vs jaxlm logits max abs diff {diff:.2e}")
    assert diff <= 1e-4
