"""Bad inputs to `python -m jaxlm.main`: each is one `error:` line naming the key or file,
with a non-zero exit and no traceback, and a config error arrives before any data preparation.

The command runs in-process (absl's `app.run` on an argv, stdout and stderr captured, a string
`sys.exit` printed as the interpreter prints it), so a case costs milliseconds, not a Python and
JAX start-up. `jaxlm.data.prepare.prepare` is replaced by a function that records the call.
"""

import contextlib
import dataclasses
import glob
import hashlib
import importlib
import io
import json
import os
import sys
import traceback

import numpy as np
import pytest

from jaxlm import checkpoint, cli
from jaxlm import model as model_lib
from jaxlm.data import tokenizer
from tests.helpers import RECIPES, REPO, tiny_config, write_bpe_tokenizer

CONFIG = """
from tests.helpers import tiny_config


def get_config():
    c = tiny_config()
    c.data.datasets.stdlib.paths = {corpus!r}
    c.train.steps = 4
    c.train.log_every = 1
    c.checkpoint.every = 2
    return c
"""


class PrepareCalled(Exception):
    """Raised by the stand-in for data preparation: validation let the config through."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("def f(x):\n    return x\n" * 20)
    config = root / "config.py"
    config.write_text(CONFIG.format(corpus=str(corpus / "*.txt")))
    corrupt = root / "corrupt.model"
    corrupt.write_bytes(b"\x0a\x05not a sentencepiece model" * 10)
    no_heldout = root / "no_heldout" / "manifest.json"
    no_heldout.parent.mkdir()
    split = {"documents": 0, "tokens": 0, "bytes": 0, "shards": []}
    tokenizer_file = no_heldout.parent / "tokenizer.model"  # loads check it against its hash
    tokenizer_file.write_bytes(b"a stand-in: only its hash is read before the held-out check")
    tokenizer_sha = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    no_heldout.write_text(
        json.dumps(
            {
                "datasets": {"a": {"weight": 1.0, "train": dict(split, documents=9), "val": split}},
                "tokenizer": {"file": "tokenizer.model", "sha256": tokenizer_sha, "vocab_size": 61},
            }
        )
    )
    plain = root / "plain.model"  # a real sentencepiece model without [MASK] or FIM pieces
    tok_cfg = tiny_config().tokenizer
    tok_cfg.vocab_size, tok_cfg.byte_fallback = 40, False
    tokenizer.train_tokenizer(["def f(x):\n    return x + 1\n" * 200], tok_cfg, str(plain))
    blocker = root / "a_file"
    blocker.write_text("not a directory")
    bad_task = root / "task.jsonl"
    bad_task.write_text("{not json\n")
    # A run checkpoint of a wider model (d_model 48, the tiny config's is 40): metadata is
    # all init_from reads before the run's own model is built.
    other = root / "wider_run" / "checkpoints"
    wider = model_lib.ModelConfig.from_config(tiny_config(d_model=48).model, 61)
    ckpt = checkpoint.Checkpointer(str(other), keep=1, async_save=False)
    state = {"step": np.zeros((), np.int32)}
    ckpt.save(1, state, None, {"model_config": dataclasses.asdict(wider)})
    ckpt.close()
    return {
        "root": root,
        "config": str(config),
        "corrupt": str(corrupt),
        "no_heldout": str(no_heldout),
        "blocker": str(blocker),
        "bad_task": str(bad_task),
        "wider_run": str(other.parent),
        "plain": str(plain),
    }


@contextlib.contextmanager
def main_module():
    """jaxlm.main with its flags, beside other commands' (benchmarks/bench.py also has --config).

    absl keeps one global flag registry: the other commands' flags of the same names step
    aside while jaxlm.main is imported afresh, and come back afterwards.
    """
    from absl import flags

    names = ("config", "workdir", "list_config")  # every flag jaxlm.main defines
    aside = {n: flags.FLAGS[n] for n in names if n in flags.FLAGS}
    for name in aside:
        delattr(flags.FLAGS, name)
    sys.modules.pop("jaxlm.main", None)
    try:
        yield importlib.import_module("jaxlm.main")
    finally:
        sys.modules.pop("jaxlm.main", None)
        for name in names:
            if name in flags.FLAGS:
                delattr(flags.FLAGS, name)
        for name, flag in aside.items():
            flags.FLAGS[name] = flag


def run_main(main_lib, argv: list[str], monkeypatch) -> tuple[int, str]:
    """Runs `python -m jaxlm.main ARGV` in this process; returns (exit code, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["jaxlm.main", *argv])
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            cli.run_cli(main_lib.main)
        except SystemExit as e:
            if isinstance(e.code, str):  # what the interpreter does with sys.exit("...")
                print(e.code, file=sys.stderr)
                code = 1
            else:
                code = e.code or 0
        except PrepareCalled:
            code = -1
        except BaseException:  # noqa: BLE001 - the test reports any escape as a traceback
            traceback.print_exc()
            code = -2
    return code, out.getvalue()


@pytest.fixture
def jaxlm_main(files, monkeypatch):
    from absl import flags

    from jaxlm.data import prepare

    def refuse(*args, **kwargs):
        raise PrepareCalled

    monkeypatch.setattr(prepare, "prepare", refuse)
    monkeypatch.setenv("JAXLM_TRACEBACK", "")

    was_parsed = flags.FLAGS.is_parsed()
    with main_module() as main_lib:

        def call(*overrides, workdir=None):
            workdir = workdir or str(files["root"] / "runs" / "w")
            argv = [f"--config={files['config']}", f"--workdir={workdir}", *overrides]
            try:
                return run_main(main_lib, argv, monkeypatch)
            finally:  # the next case parses its own argv from scratch
                for name in [n for n in flags.FLAGS if n.startswith("config.")]:
                    delattr(flags.FLAGS, name)  # an override registers a flag per key it names
                flags.FLAGS.unparse_flags()

        yield call
    if was_parsed:
        flags.FLAGS.mark_as_parsed()


# (overrides, text the error line must contain); {name} is filled from the `files` fixture.
CASES = [
    (["--config.mesh.preset=bogus"], "mesh.preset"),
    (["--config.model.remat=bogus"], "model.remat"),
    (["--config.model.attention=bogus"], "model.attention"),
    (["--config.model.dtype=float16"], "model.dtype"),
    (["--config.init_from=bogus"], "init_from='bogus'"),
    (["--config.init_from=hf:/no/such/model"], "/no/such/model"),
    (["--config.optim.schedule=bogus"], "optim.schedule"),
    (["--config.optim.name=sgd"], "optim.name must be one of"),
    (["--config.optim.groups.vector.lr_scale=-1.0"], "optim.groups.vector.lr_scale=-1.0"),
    (["--config.checkpoint.every=0"], "checkpoint.every=0"),
    (["--config.train.log_every=0"], "train.log_every=0"),
    (["--config.train.grad_accum=0"], "train.grad_accum=0"),
    (["--config.checkpoint.keep=0"], "checkpoint.keep=0"),
    (["--config.eval.every=-1"], "eval.every=-1"),
    (["--config.optim.lr=-0.1"], "optim.lr=-0.1"),
    (["--config.optim.warmup_steps=-5"], "optim.warmup_steps=-5"),
    (["--config.optim.b2=1.5"], "optim.b2=1.5"),
    (["--config.train.steps=-1"], "train.steps=-1"),
    (["--config.train.spike_ratio=-1.0"], "train.spike_ratio=-1.0"),
    (["--config.sample.top_p=2.0"], "sample.top_p=2.0"),
    (["--config.tokenizer.path={corrupt}"], "tokenizer.path='{corrupt}' is not a readable"),
    (["--config.tokenizer.path=/no/such.model"], "tokenizer.path='/no/such.model' does not"),
    (["--config.tokenizer.model_type=bogus"], "tokenizer.model_type='bogus'"),
    (["--config.data.datasets.stdlib.paths=/no/such/dir/*.txt"], "data.datasets.stdlib.paths"),
    (["--config.data.manifest=/no/such/manifest.json"], "data.manifest='/no/such/manifest.json'"),
    (["--config.data.val_fraction=0.0"], "data.val_fraction=0.0"),
    (["--config.mesh.shape=(1,0,1)"], "mesh.shape=(1, 0, 1)"),
    (["--config.mesh.shape=(1,2)"], "mesh.shape needs 3 entries"),
    (["--config.mesh.shape=(3,-1,1)"], "mesh.shape=(3, -1, 1)"),  # 8 devices
    (["--config.train.batch_size=12"], "train.batch_size=12"),  # 8-way batch split
    (["--config.train.grad_accum=3"], "train.batch_size=8 must be a multiple of train.grad_accum"),
    (["--config.eval.batch_size=4"], "eval.batch_size=4"),
    (["--config.train.seq_len=128"], "train.seq_len=128 exceeds model.max_seq_len=64"),
    (["--config.model.n_kv_heads=3"], "model.n_kv_heads=3"),
    (["--config.model.head_dim=9"], "model.head_dim=9"),
    (["--config.train.stepz=3"], "stepz"),
    (["--config.data.datasets.domain.paths=x"], "domain; datasets are: stdlib"),
    (["--config.data.datasets.stdlib.split=pages"], "config.data.datasets.stdlib.split='pages'"),
    (["--config.eval.task_files=/no/such/task.jsonl"], "/no/such/task.jsonl"),
    # (a stage's dict braces are doubled: every override is str.format-ed with `files`)
    (["--config.stages=({{'steps': 2}},)"], "train.steps=4 and config.stages both set"),
    (
        ["--config.train.steps=0", "--config.stages=({{'steps': 2}}, {{'seq_len': 128}})"],
        "stages[1].seq_len=128 exceeds model.max_seq_len=64",  # checked before its budget
    ),
    (
        ["--config.train.steps=0", "--config.stages=({{'steps': 2, 'weights': {{'web': 1.0}}}},)"],
        "stages[0].weights names 'web'",
    ),
    (
        ["--config.train.steps=0", "--config.stages=({{'tokens': 64, 'batch_size': 12}},)"],
        "stages[0].batch_size=12 must be a multiple of the micro-batch",
    ),
    (
        ["--config.train.steps=0", "--config.stages=({{'steps': 4, 'lr': {{'decay': 'step'}}}},)"],
        "stages[0].lr.decay='step' must be one of",
    ),
    (["--config.branch=True"], "config.branch=True continues another run's checkpoint"),
    (["--config.objective=bert"], "objective must be one of causal, masked, prefix, fim"),
    (["--config.objectives.mask_rate=1.5"], "objectives.mask_rate=1.5"),
    (["--config.objectives.fim_rate=2.0"], "objectives.fim_rate=2.0"),
    (["--config.objectives.mask_token_rate=0.95"], "objectives.mask_token_rate + objectives"),
    (
        ["--config.objective=masked", "--config.tokenizer.path={plain}"],
        "objective=masked needs the pieces ['[MASK]'], which the tokenizer {plain} lacks",
    ),
    (["--config.eval.task_files={bad_task}"], "{bad_task}:1"),
    (["--config.eval.task_files={root}"], "task file '{root}' is a directory"),
    # non-finite floats, anywhere in the config
    (["--config.optim.lr=nan"], "optim.lr=nan must be a finite number"),
    (["--config.optim.muon.lr=inf"], "optim.muon.lr=inf must be a finite number"),
    (["--config.train.spike_ratio=-inf"], "train.spike_ratio=-inf must be a finite number"),
    # tokenizer settings sentencepiece would refuse only after curation
    (["--config.tokenizer.vocab_size=10"], "tokenizer.vocab_size=10 is too small: 262 pieces"),
    (["--config.tokenizer.sample_bytes=0"], "tokenizer.sample_bytes=0 must be positive"),
    (["--config.data.max_document_bytes=0"], "config.data.max_document_bytes=0 must be"),
    (
        ["--config.init_from=ckpt:{wider_run}"],
        "has d_model=48 but the run's model.d_model is 40",
    ),
    (
        ["--config.data.manifest={no_heldout}"],
        "dataset 'a' in {no_heldout} has no held-out documents",
    ),
]


@pytest.mark.parametrize("overrides,names", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_error_line_before_any_data_work(jaxlm_main, files, overrides, names):
    code, output = jaxlm_main(*(o.format(**files) for o in overrides))
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code not in (0, -1), (
        f"exit {code}; prepare was {'called' if code == -1 else 'not called'}"
    )
    assert "Traceback" not in output, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    assert names.format(**files) in errors[0], errors[0]


def test_unwritable_workdir_is_one_error_line(jaxlm_main, files):
    code, output = jaxlm_main(workdir=str(files["root"] / "a_file" / "run"))
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in output
    assert len(errors) == 1 and "--workdir" in errors[0] and "a_file" in errors[0], errors


def test_a_valid_config_passes_validation_and_reaches_data_preparation(jaxlm_main):
    # The control: the same harness with no bad input gets as far as preparing the data.
    code, output = jaxlm_main()
    assert code == -1, output[-3000:]


def test_ctrl_c_before_training_is_one_line_and_exit_130(jaxlm_main, monkeypatch):
    from jaxlm.data import prepare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises during data preparation

    monkeypatch.setattr(prepare, "prepare", interrupted)
    code, output = jaxlm_main()
    assert code == 130 and "Traceback" not in output, output[-3000:]
    assert output.strip().splitlines()[-1] == (
        "stopped by Ctrl-C; checkpoints already written are kept."
    )


def _base_model_dir(root) -> str:
    """A local Hugging Face Llama directory as validation reads one: config.json (shaped like a
    small TinySolar: 4,096 positions) and a tokenizer.json. Weights are read only by training."""
    os.makedirs(root)
    tok = write_bpe_tokenizer(str(root))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    }
    with open(root / "config.json", "w") as f:
        json.dump(config, f)
    return str(root)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_passes_validation(name, tmp_path):
    # The other side of the table: the checks refuse nothing a shipped recipe asks for.
    from jaxlm import validate

    recipe = importlib.import_module(f"configs.{name}")
    if name == "continue_pretraining":  # its command names a base model and a domain corpus
        config = recipe.get_config(_base_model_dir(tmp_path / "base"))
        (tmp_path / "domain.txt").write_text("a domain document\n" * 200)
        config.data.datasets.domain.paths = str(tmp_path / "domain.txt")
        assert config.init_from.startswith("hf:")  # the base model is validated, not skipped
    else:
        config = recipe.get_config()
    validate.check(config, str(tmp_path / "run"))


def test_recipes_are_found_by_glob():
    # Guards the test above against an empty or partial list: every recipe file, none omitted.
    assert {"tiny", "tiny_encoder", "continue_pretraining", "llama_8b"} <= set(RECIPES)
    assert "base" not in RECIPES and len(RECIPES) == len(glob.glob(f"{REPO}/configs/*.py")) - 2
