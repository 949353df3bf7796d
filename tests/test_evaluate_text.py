"""tools/evaluate.py: perplexity of a Hugging Face model on text equals transformers' on the same
windows (disjoint and sliding), a checkpoint import gives the same numbers, and bad input is one
sentence."""

import inspect
import json
import json.decoder
import math
import os
import shutil

import pytest

from jaxlm import cli
from jaxlm.errors import JaxlmError
from jaxlm.evaluate import text
from tests.helpers import transformers_nll
from tools import evaluate as evaluate_tool


def run_evaluate(argv: list[str]) -> int:
    """`python tools/evaluate.py ARGV` in this process; its exit status."""
    return cli.call(evaluate_tool.main, evaluate_tool.FLAGS, argv)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A text file (one document) and a JSONL file (three), from the standard library."""
    root = tmp_path_factory.mktemp("data")
    source = inspect.getsource(json.decoder)
    (root / "decoder.txt").write_text(source[:1500])
    with open(root / "docs.jsonl", "w") as f:
        for part in (source[2000:2300], source[3000:3100], source[4000:4600]):
            f.write(json.dumps({"body": part}) + "\n")
    return root


@pytest.mark.parametrize("stride", [32, 12])
def test_perplexity_equals_transformers_on_the_same_windows(hf_model, data, tmp_path, stride):
    hf_dir, model, tok = hf_model
    out = tmp_path / "result.json"
    args = [f"--hf_dir={hf_dir}", f"--data={data / 'decoder.txt'},{data / 'docs.jsonl'}"]
    args += ["--text_field=body", "--seq_len=32", f"--stride={stride}", f"--json={out}"]
    assert run_evaluate(args) == 0
    result = json.loads(out.read_text())
    docs = {
        "decoder.txt": [(data / "decoder.txt").read_text()],
        "docs.jsonl": [json.loads(line)["body"] for line in open(data / "docs.jsonl")],
    }
    for name, texts in docs.items():
        got = result["data"][str(data / name)]
        nll, count = transformers_nll(model, tok, texts, 32, stride)
        assert got["tokens"] == count and got["documents"] == len(texts)
        assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-3)
        nbytes = sum(len(t.encode()) for t in texts)
        assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-3)
    assert result["data"]["all"]["tokens"] == sum(
        r["tokens"] for k, r in result["data"].items() if k != "all"
    )


def test_an_imported_checkpoint_gives_the_same_numbers(hf_model, data, tmp_path):
    from jaxlm.convert import hf

    hf_dir = hf_model[0]
    hf.import_hf(hf_dir, str(tmp_path / "imported"), progress=False)
    results = []
    for source in (f"--hf_dir={hf_dir}", f"--workdir={tmp_path / 'imported'}"):
        out = tmp_path / "r.json"
        assert (
            run_evaluate(
                [source, f"--data={data / 'decoder.txt'}", "--seq_len=32", f"--json={out}"]
            )
            == 0
        )
        results.append(json.loads(out.read_text())["data"])
    assert results[0] == results[1]


def test_windows_score_every_token_once_with_full_context():
    for n, seq_len, stride in [(1, 8, 8), (8, 8, 8), (9, 8, 8), (30, 8, 3), (30, 8, 1)]:
        spans = list(text.windows(n, seq_len, stride))
        scored = [j for first, end, k in spans for j in range(end - k + 1, end + 1)]
        assert scored == list(range(1, n + 1))  # targets t[1..n], each once, in order
        for first, end, k in spans:
            assert end - first == min(seq_len, end)  # a full window whenever the text allows
            assert k <= (seq_len if first == 0 else stride)


def one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].endswith("."), err
    return err[0]


def test_bad_inputs_are_one_sentence(hf_model, data, tmp_path, capsys):
    hf_dir = hf_model[0]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [
        ([f"--hf_dir={hf_dir}", f"--data={tmp_path / 'missing.txt'}"], "matches no"),
        ([f"--hf_dir={hf_dir}", f"--data={empty}"], "holds no text to evaluate"),
    ]
    no_tokenizer = tmp_path / "no_tok"
    shutil.copytree(hf_dir, no_tokenizer)
    os.remove(no_tokenizer / "tokenizer.json")
    cases.append(
        ([f"--hf_dir={no_tokenizer}", f"--data={data / 'decoder.txt'}"], "has no tokenizer.json")
    )
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    cases.append(([f"--hf_dir={gpt2}", f"--data={data / 'decoder.txt'}"], "only Llama"))
    imported = tmp_path / "imported"
    from jaxlm.convert import hf

    hf.import_hf(hf_dir, str(imported), progress=False)
    shutil.rmtree(imported / "tokenizer")
    cases.append(([f"--workdir={imported}", f"--data={data / 'decoder.txt'}"], "no tokenizer"))
    for args, message in cases:
        assert run_evaluate(args) == 1
        assert message in one_line(capsys)
    with pytest.raises(JaxlmError, match="--stride=9 must be between 1 and"):
        list(text.windows(10, 8, 9))
