"""Named validation sets (`config.data.validation`): none of their documents reaches a training
batch, a run reports them at every eval (stdout, metrics.jsonl, TensorBoard, the plot), and a bad
set is one sentence before any work."""

import json
import os

import ml_collections
import numpy as np
import pytest

from jaxlm import spec as run_spec
from jaxlm import validate
from jaxlm.data import content_split, prepare, records, stream
from jaxlm.data import manifest as manifest_lib
from jaxlm.errors import ConfigError
from tests.helpers import copy_stdlib_subset, data_configs, tiny_config

VAL_FRACTION = 0.3


def reserved_file(names, root):
    """A corpus file the plain preparation puts in its training split (the positive control)."""
    for name in names:
        text = open(os.path.join(root, name), encoding="utf-8").read()
        if content_split.split_of(text, VAL_FRACTION) == "train":
            return name
    raise AssertionError("no training file")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(manifest with validation set 'held', manifest without it, the held file's path, its
    text-only companion): the held file is also in the training corpus."""
    root = tmp_path_factory.mktemp("validation")
    # Small documents keep the run's final (whole-split) evaluation short.
    names = copy_stdlib_subset(str(root / "corpus"), every=97, offset=5, limit=16)
    for name in names:
        path = root / "corpus" / name
        path.write_text(path.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    held = os.path.join(root, "corpus", reserved_file(names, root / "corpus"))
    extra = root / "extra.txt"
    extra.write_text(open(held, encoding="utf-8").read()[:800] + "\n# only in validation\n")
    data, tok = data_configs(
        str(root / "corpus" / "*.py"), root / "cache", val_fraction=VAL_FRACTION
    )
    plain = manifest_lib.load(prepare.prepare(data, tok, log=lambda s: None))
    assert plain["datasets"]["code"]["val"]["documents"] > 0  # the run evaluates on them
    data.validation = ml_collections.ConfigDict(
        {"held": ml_collections.ConfigDict({"paths": f"{held},{extra}", "text_field": "text"})}
    )
    with_sets = manifest_lib.load(prepare.prepare(data, tok, log=lambda s: None))
    return with_sets, plain, held, str(extra)


def records_of(m, name, split):
    return [
        r.tolist() for p in manifest_lib.shard_paths(m, name, split) for r in records.read_shard(p)
    ]


def windows(rows, k=8):
    """Every run of k consecutive tokens in `rows`."""
    return {tuple(row[i : i + k]) for row in rows for i in range(len(row) - k + 1)}


def training_windows(m, n_batches):
    """The 8-token runs of every target row of the first `n_batches` training batches."""
    config = tiny_config()
    config.model.max_seq_len, config.train.seq_len, config.train.batch_size = 64, 64, 4
    config.data.datasets = {n: dict(paths="-", weight=1.0) for n in m["datasets"]}
    batches = stream.training_batches(run_spec.build(config), m, 0, 1, 1)
    return windows(row for _ in range(n_batches) for row in next(batches)["targets"].tolist())


def test_no_validation_document_reaches_a_training_batch(prepared):
    from jaxlm.data import tokenizer

    with_sets, plain, held, extra = prepared
    texts = [open(p, encoding="utf-8").read() for p in (held, extra)]
    entry = with_sets["validation"]["held"]
    assert entry["documents"] == 2 and entry["removed_from_training"] == {"code": 1}
    train_tokens = sum(ds["train"]["tokens"] for ds in with_sets["datasets"].values())
    n_batches = 2 * train_tokens // (4 * 64) + 1  # two epochs of the training split
    for m, reserved in ((plain, False), (with_sets, True)):
        tok = tokenizer.load(manifest_lib.tokenizer_path(m))
        record = [*tok.encode(texts[0]), tok.eos_id]
        train = records_of(m, "code", "train")
        assert (record in train) is not reserved and record not in records_of(m, "code", "val")
        # Runs of the held document that no other training document has: seeing one in a
        # batch means the document was trained on (the positive control: without the set, it
        # is).
        own = windows([record]) - windows(r for r in train if r != record)
        assert len(own) > 100
        assert bool(own & training_windows(m, n_batches)) is not reserved
    assert sorted(records_of(with_sets, "held", "validation")) == sorted(
        [*tok.encode(t), tok.eos_id] for t in texts
    )
    # The other documents are untouched.
    assert with_sets["datasets"]["code"]["train"]["documents"] == (
        plain["datasets"]["code"]["train"]["documents"] - 1
    )


@pytest.mark.slow  # a short training run: ~20 s of compiling on a 2-core CPU
def test_a_run_reports_every_validation_set_at_every_eval(prepared, tmp_path, capsys):
    from jaxlm import loop
    from tools import plot_metrics

    with_sets, _, held, extra = prepared
    config = tiny_config()
    config.data.manifest = os.path.join(with_sets["root"], "manifest.json")
    config.data.datasets = ml_collections.ConfigDict(
        {"code": ml_collections.ConfigDict({"paths": held, "text_field": "text", "weight": 1.0})}
    )
    config.data.validation.held = ml_collections.ConfigDict({"paths": held})
    config.model.max_seq_len = 32
    config.train.seq_len, config.train.batch_size, config.train.steps = 32, 8, 2
    config.train.log_every, config.eval.every, config.eval.max_batches = 1, 1, 1
    config.eval.next_line_examples, config.checkpoint.every = 0, 2
    config.sample.max_tokens, config.checkpoint.async_save = 0, False
    workdir = str(tmp_path / "run")
    loop.run(config, workdir)

    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = {r["step"]: r for r in lines if "eval/loss" in r}
    assert sorted(evals) == [1, 2]  # the periodic eval and the final one
    for record in evals.values():
        for key in ("loss", "perplexity", "bits_per_byte"):
            assert np.isfinite(record[f"eval/held/{key}"])
        assert record["eval/held/loss"] != record["eval/loss"]  # its own numbers
    out = capsys.readouterr().out
    eval_lines = [line for line in out.splitlines() if line.startswith("eval ")]
    assert len(eval_lines) == 2 and all(" | held " in line for line in eval_lines)

    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(os.path.join(workdir, "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/held/bits_per_byte")] == [1, 2]

    import matplotlib.figure

    drawn = {}
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn["labels"] = [t.get_text() for t in fig.axes[5].get_legend().get_texts()]
        return original(fig, *args, **kwargs)

    matplotlib.figure.Figure.savefig = keep
    try:
        plot_metrics.plot([workdir], str(tmp_path / "m.png"))
    finally:
        matplotlib.figure.Figure.savefig = original
    assert "run held" in drawn["labels"]


def data_config(tmp_path, **validation):
    config = tiny_config()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x\n" * 20)
    config.data.datasets.stdlib.paths = str(corpus)
    config.data.validation = ml_collections.ConfigDict(
        {k: ml_collections.ConfigDict(v) for k, v in validation.items()}
    )
    return config


@pytest.mark.parametrize(
    "validation,message",
    [
        ({"wiki": {"paths": "/no/such/*.txt"}}, "data.validation.wiki.paths='/no/such/*.txt': "),
        ({"stdlib": {"paths": "{corpus}"}}, "data.validation.stdlib has the name of a training"),
        ({"a/b": {"paths": "{corpus}"}}, "a validation set's name must be letters"),
        ({"wiki": {"path": "{corpus}"}}, "data.validation.wiki must be a ConfigDict with paths"),
    ],
)
def test_a_bad_validation_set_is_one_sentence_before_any_work(tmp_path, validation, message):
    corpus = str(tmp_path / "corpus.txt")
    validation = {
        k: {f: v.format(corpus=corpus) for f, v in fields.items()}
        for k, fields in validation.items()
    }
    with pytest.raises(ConfigError) as e:
        validate.check(data_config(tmp_path, **validation), str(tmp_path / "w"))
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).endswith(".")


def test_a_manifest_without_the_named_set_is_one_sentence(prepared):
    plain = prepared[1]
    config = tiny_config()
    config.data.datasets = {"code": dict(paths="-", weight=1.0)}
    config.data.validation.wiki = ml_collections.ConfigDict({"paths": prepared[2]})
    with pytest.raises(ConfigError, match=r"data.validation.wiki is not in .*; prepare the data"):
        validate.check_manifest(plain, "m.json", run_spec.build(config))
