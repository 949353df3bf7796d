"""The lm-eval adapter: on a local multiple-choice task, the `jaxlm` model's loglikelihoods equal
the harness's own `hf` backend's within 1e-4 per request and give the same accuracy; rolling
loglikelihood equals tools/evaluate.py's windows; greedy generation equals jaxlm.generate."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task reads local files only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import accelerate  # noqa: F401 - the harness's hf backend needs it: fail here, naming it
import lm_eval

from jaxlm.evaluate import lm_eval as adapter  # noqa: E402 - after the offline switches

QUESTIONS = [
    (
        "def scan_once(string, idx):\n    try:\n        nextchar =",
        [" string[idx]", " idx", " None", " 0"],
        0,
    ),
    (
        "    if nextchar == '\"':\n        return",
        [" parse_string(string)", " True", " []", " idx + 1"],
        0,
    ),
    (
        "class JSONDecodeError(ValueError):\n    def __init__(self, msg,",
        [" doc, pos):", " x):", " *args):", " self):"],
        0,
    ),
    ("import re\n\nfrom json import", [" scanner", " decoder", " os", " sys"], 1),
    ("        raise StopIteration(idx) from", [" None", " err", " e", " exc"], 0),
]

TASK_YAML = """task: jaxlm_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    with open(root / "toy.jsonl", "w") as f:
        for context, choices, gold in QUESTIONS:
            f.write(json.dumps({"context": context, "choices": choices, "gold": gold}) + "\n")
    (root / "toy.yaml").write_text(TASK_YAML.format(data=root / "toy.jsonl"))
    return str(root)


def run_harness(model, model_args, task_dir):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["jaxlm_toy_mc"],
        task_manager=TaskManager(include_path=task_dir, include_defaults=False),  # no 14k-file scan
        batch_size=4,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def loglikelihoods(results):
    samples = sorted(results["samples"]["jaxlm_toy_mc"], key=lambda s: s["doc_id"])
    return np.array([[float(r[0][0]) for r in s["resps"]] for s in samples])


def test_adapter_equals_the_hf_backend_on_a_local_task(hf_model, task_dir):
    hf_dir = hf_model[0]
    ours = run_harness("jaxlm", {"hf_dir": hf_dir}, task_dir)
    theirs = run_harness(
        "hf", {"pretrained": hf_dir, "dtype": "float32", "device": "cpu"}, task_dir
    )
    a, b = loglikelihoods(ours), loglikelihoods(theirs)
    assert a.shape == (5, 4) and np.abs(b).min() > 1.0  # real numbers, not zeros
    print(f"adapter vs hf backend: max |diff| {np.abs(a - b).max():.2e}")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["jaxlm_toy_mc"][metric] == theirs["results"]["jaxlm_toy_mc"][metric]


def test_rolling_and_generation_follow_jaxlm(hf_model):
    from lm_eval.api.instance import Instance

    from jaxlm import generate
    from jaxlm.evaluate import text

    hf_dir, _, tok = hf_model
    lm = adapter.JaxlmLM(hf_dir=hf_dir, max_length=16, max_gen_toks=6)
    doc = "def decode(self, s, _w=WHITESPACE.match):\n    obj, end = self.raw_decode(s)\n"
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)])
    corpus = text.Corpus("doc", [lm.tok.encode(doc)], len(doc.encode()))
    expected = text.evaluate_corpus(lm.model, corpus, seq_len=16, stride=16, batch_size=4)
    assert rolling[0] == pytest.approx(-expected["nll"], rel=1e-6)

    prompt = "import re\n\nfrom json import"
    request = Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 6}), 0)
    (completion,) = lm.generate_until([request])
    new = generate.generate(
        lm.model.setup.graphdef,
        lm.model.params,
        [lm.tok_encode(prompt)[-(16 - 6) :]],  # the context is cut to leave room for 6 tokens
        max_new_tokens=6,
        eos_id=lm.tok.eos_id,
    )[0]
    assert completion == lm.tok.decode(new).split("\n")[0]
