"""The Hugging Face families beyond Llama through the user-facing tools, on each family's tiny
random model (tests/family_models.py) with a byte-level BPE tokenizer and a chat template:
`tools/evaluate.py --hf_dir` gives transformers' perplexity on the same windows, and
`configs/continue_pretraining.py:<dir>` trains a few steps and exports a model transformers
loads with the source's chat template and special ids.
"""

import json
import math
import os
import re
import sysconfig

import pytest

from jaxlm import cli
from jaxlm.convert import hf
from tests.family_models import FAMILIES, WINDOW, make_family_model
from tests.helpers import continue_pretraining_cli, transformers_nll, write_bpe_tokenizer
from tools import evaluate as evaluate_tool

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
SEQ_LEN = 32  # evaluation windows: longer than the sliding window
assert SEQ_LEN > 4 * WINDOW


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGPARSE = os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(text file to evaluate: ~420 tokens, ~14 windows; a 'book' of ~20,000 tokens to
    continue pretraining on; the data cache every family's run shares)."""
    root = tmp_path_factory.mktemp("corpus")
    text = open(ARGPARSE, encoding="utf-8").read()
    (root / "eval.txt").write_text(text[:500])
    (root / "book.txt").write_text(text[1000:33000])
    return root / "eval.txt", root / "book.txt", root / "cache"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def source(request, tmp_path_factory):
    """(family, HF dir, torch model, tokenizers.Tokenizer): the family's tiny model with a BPE
    tokenizer whose config names bos/eos/pad (ids 1, 2, 0, as the model's config) and a chat
    template."""
    family = request.param
    path = tmp_path_factory.mktemp(family)
    torch_model = make_family_model(family, path)
    tok = write_bpe_tokenizer(str(path))
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(pad_token="<unk>", chat_template=CHAT_TEMPLATE)  # <unk> is id 0
    config_path.write_text(json.dumps(config))
    return family, path, torch_model, tok


def test_evaluate_perplexity_equals_transformers_on_the_same_windows(source, corpus, tmp_path):
    """lm-eval's rolling windows of SEQ_LEN tokens (BOS first), scored by jaxlm's packed
    forward pass and by transformers one batch per window length."""
    family, path, torch_model, tok = source
    text_file, out = corpus[0], tmp_path / "result.json"
    argv = [f"--hf_dir={path}", f"--data={text_file}", f"--seq_len={SEQ_LEN}", f"--json={out}"]
    assert cli.call(evaluate_tool.main, evaluate_tool.FLAGS, argv) == 0
    got = json.loads(out.read_text())["data"][str(text_file)]
    nll, count = transformers_nll(torch_model, tok, [text_file.read_text()], SEQ_LEN, SEQ_LEN)
    assert got["tokens"] == count > 10 * SEQ_LEN
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    print(f"{family}: perplexity {got['perplexity']:.6f}, transformers {math.exp(nll / count):.6f}")


# A few steps of the recipe on the book; held-out loss before and after, no sample.
OVERRIDES = {
    "data.num_proc": 1,
    "data.curation.quality.preset": "none",
    "model.dtype": "float32",
    "train.steps": 3,
    "train.batch_size": 8,  # the 8 fake devices of an in-process run
    "train.seq_len": 24,
    "eval.every": 0,
    "eval.batch_size": 8,
    "eval.next_line_examples": 0,
    "optim.init_lr": 3e-3,  # a random tiny model needs more than the recipe's 5e-5
    "optim.lr": 3e-3,
    "optim.warmup_steps": 1,
    "sample.max_tokens": 0,
    "logging.tensorboard": False,
}
CLI_FAMILY = "gemma3"  # the one run through `python -m jaxlm.main`; the others in-process


@pytest.mark.slow  # a train-step compile per family, one of them in a jaxlm.main subprocess
def test_continue_pretraining_trains_and_exports(source, corpus, tmp_path, capsys):
    """`configs/continue_pretraining.py:<dir>`: held-out loss falls over 3 steps, and the
    export is the source's class with the source's windows, chat template and bos/eos/pad."""
    import torch
    import transformers

    family, path, torch_model, _ = source
    workdir, out = tmp_path / "run", tmp_path / "exported"
    overrides = {
        **OVERRIDES,
        "data.datasets.domain.paths": str(corpus[1]),
        "data.cache_dir": str(corpus[2]),
    }
    if family == CLI_FAMILY:
        log = continue_pretraining_cli(path, workdir, overrides)
    else:
        from configs import continue_pretraining
        from jaxlm import loop

        config = continue_pretraining.get_config(str(path))
        for key, value in overrides.items():
            section, *inner, name = key.split(".")
            node = config[section]
            for part in inner:
                node = node[part]
            node[name] = value
        capsys.readouterr()
        loop.run(config, str(workdir))
        log = capsys.readouterr().out
    before, after = map(float, re.search(r"domain ([\d.]+) -> ([\d.]+)", log).groups())
    print(f"{family}: held-out loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.1

    hf.export_hf(str(workdir), str(out), progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model) is type(torch_model)
    for key in ("sliding_window", "layer_types", "query_pre_attn_scalar", "head_dim"):
        if hasattr(torch_model.config, key):
            assert getattr(model.config, key) == getattr(torch_model.config, key), key
    trained, base = model.state_dict(), torch_model.state_dict()
    assert sorted(trained) == sorted(base)
    assert not torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    tok, source_tok = (transformers.AutoTokenizer.from_pretrained(str(d)) for d in (out, path))
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False) == source_tok.apply_chat_template(
        chat, tokenize=False
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    for name in ("config.json", "generation_config.json"):
        ids = json.loads((out / name).read_text())
        assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (1, 2, 0), name
