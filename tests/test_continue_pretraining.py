"""Continued pretraining as a user runs it: a local Hugging Face model directory with its own
tokenizer (special ids, BOS rule, chat template), the recipe's command on one .txt file, the
before -> after held-out loss, `tools/generate.py` on import and run workdirs, and an export
whose tokenizer files and greedy text equal the source's in `transformers`.

The base model is a tiny random Llama with a byte-level BPE tokenizer trained here on standard
library text (no downloads): <pad> 0, <s> 1 (put before every prompt), </s> 2.
"""

import json
import os
import re
import sysconfig

import pytest

from jaxlm import cli
from jaxlm.convert import hf
from jaxlm.data import tokenizer as tokenizer_lib
from tests.helpers import continue_pretraining_cli, make_hf_model
from tools import generate as generate_tool


def run_generate(argv: list[str]) -> int:
    """`python tools/generate.py ARGV` in this process; its exit status."""
    return cli.call(generate_tool.main, generate_tool.FLAGS, argv)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
PROMPT = "def parse_args(self"


def _stdlib_text(*names):
    return "\n\n".join(open(os.path.join(STDLIB, n), encoding="utf-8").read() for n in names)


def _tokenizer(directory, add_bos=True):
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json) trained on stdlib source."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_stdlib_text("json/decoder.py", "textwrap.py").split("\n\n"), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": add_bos,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A local 'Hugging Face download': weights, config, tokenizer files, generation config."""
    path = tmp_path_factory.mktemp("base")
    vocab = _tokenizer(path)
    make_hf_model(
        path,
        seed=5,
        vocab=vocab,
        hidden_size=48,
        intermediate_size=96,
        head_dim=12,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    with open(path / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, f)
    return path


def transformers_greedy(model_dir, prompt, n):
    """transformers' own greedy continuation of `prompt` (text of the new tokens)."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def jaxlm_greedy(workdir, prompt, n, capsys):
    """`tools/generate.py --workdir=... --temperature=0`'s continuation (text)."""
    capsys.readouterr()
    code = run_generate(
        [f"--workdir={workdir}", f"--prompt={prompt}", f"--max_tokens={n}", "--temperature=0"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    return out.rstrip("\n")[len(prompt) :]


@pytest.mark.parametrize("add_bos", [True, False])
def test_prompts_start_with_bos_exactly_where_transformers_puts_one(add_bos, tmp_path):
    import transformers

    _tokenizer(tmp_path, add_bos=add_bos)
    ours = tokenizer_lib.load(str(tmp_path / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in (PROMPT, "x = 1\n", " leading space"):
        assert tokenizer_lib.prompt_ids(ours, text) == theirs(text)["input_ids"]
    assert ours.add_bos == add_bos


def test_export_keeps_the_source_tokenizer_and_generate_works_on_an_import(base, tmp_path, capsys):
    import transformers

    workdir, out = tmp_path / "imported", tmp_path / "exported"
    hf.import_hf(str(base), str(workdir), progress=False)
    hf.export_hf(str(workdir), str(out), progress=False)

    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["add_bos_token"] is True
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert (special["bos_token"], special["eos_token"], special["pad_token"]) == (
        "<s>",
        "</s>",
        "<pad>",
    )
    for name in ("generation_config.json", "config.json"):
        ids = json.loads((out / name).read_text())
        assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (1, 2, 0), name
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    chat = [{"role": "user", "content": "hi"}]
    source_tok = transformers.AutoTokenizer.from_pretrained(str(base))
    assert tok.apply_chat_template(chat, tokenize=False) == source_tok.apply_chat_template(
        chat, tokenize=False
    )

    # tools/generate.py samples the import workdir as transformers does the source directory.
    assert jaxlm_greedy(workdir, PROMPT, 12, capsys) == transformers_greedy(base, PROMPT, 12)


@pytest.mark.slow  # one jaxlm.main subprocess (prepare, compile, 30 steps): ~35 s of CPU
def test_continued_pretraining_command_on_one_text_file(base, tmp_path, capsys):
    book = tmp_path / "book.txt"  # one long file: the recipe's split cuts it into documents
    book.write_text(_stdlib_text("argparse.py"))
    workdir = tmp_path / "run"
    overrides = {
        "data.datasets.domain.paths": str(book),
        "data.cache_dir": str(tmp_path / "cache"),
        "data.num_proc": 1,
        "data.curation.quality.preset": "none",
        "model.dtype": "float32",
        "train.steps": 30,
        "train.batch_size": 8,
        "train.seq_len": 64,
        "eval.every": 0,
        "eval.batch_size": 8,
        "eval.next_line_examples": 0,
        "optim.init_lr": 3e-4,  # a random tiny model needs more than the recipe's 5e-5
        "optim.lr": 3e-3,
        "optim.warmup_steps": 5,
        "sample.max_tokens": 0,
        "logging.tensorboard": False,
    }
    log = continue_pretraining_cli(base, workdir, overrides)
    print(log[-1500:])
    start = float(re.search(r"^eval\s+0 \| loss ([\d.]+)", log, re.M).group(1))
    end = float(re.search(r"^eval\s+30 \| loss ([\d.]+)", log, re.M).group(1))
    before, after = map(float, re.search(r"domain ([\d.]+) -> ([\d.]+)", log).groups())
    assert (before, after) == pytest.approx((start, end), abs=1e-4)
    assert after < before - 0.3

    out = tmp_path / "exported"
    hf.export_hf(str(workdir), str(out), progress=False)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert jaxlm_greedy(workdir, PROMPT, 16, capsys) == transformers_greedy(out, PROMPT, 16)
