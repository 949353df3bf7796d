"""Multiple-choice scoring benchmark: each question's context run once vs once per choice.

    python benchmarks/bench_eval.py --config=configs/tiny.py [--examples=256] [--context_lines=4] \\
        [--choices=4] [--batch_size=16] [--repeats=3]

Builds the next-line task (`jaxlm.evaluate.tasks.build_next_line_task`) from the Python
standard library's source with a tokenizer trained on it, and scores it with the config's model
(random weights: speed does not depend on them) two ways, after one untimed call each:
- per choice: every (BOS + context + choice) packed as its own segment into rows of
  train.seq_len (`scoring.score_sequences`), the layout multiple-choice scoring used before;
- shared: contexts packed into rows and run once, every choice scored against their KV cache
  (`choices.score_continuations`, what `score_task` does now).
Prints examples/s for each (the best of --repeats), the speed-up, tokens run through the model,
and the largest difference between the two layouts' scores (accuracies must be equal).
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import timing  # noqa: E402
from jaxlm import sharding, train  # noqa: E402
from jaxlm import spec as run_spec
from jaxlm.data import sources  # noqa: E402
from jaxlm.data import tokenizer as tokenizer_lib  # noqa: E402
from jaxlm.evaluate import choices, scoring, tasks  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_EXAMPLES = flags.DEFINE_integer("examples", 256, "Questions in the task.")
_CONTEXT = flags.DEFINE_integer("context_lines", 4, "Lines of context per question.")
_CHOICES = flags.DEFINE_integer("choices", 4, "Choices per question.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows of train.seq_len tokens per call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs of each layout; the best counts.")


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    files = sources.stdlib_files()[::7]
    texts = [open(f.path, encoding="utf-8", errors="replace").read() for f in files]
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer_lib.train_tokenizer(texts, config.tokenizer, os.path.join(tmp, "t.model"))
    examples = tasks.build_next_line_task(
        texts,
        _EXAMPLES.value,
        seed=0,
        context_lines=_CONTEXT.value,
        n_choices=_CHOICES.value,
    )
    seq_len = config.train.seq_len
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    setup = train.Setup(run_spec.build(config), tok.vocab_size, mesh)
    params = setup.init_state()["params"]
    groups = choices.encode_task(tok, examples, seq_len)
    seqs = [([*context, *ids], len(ids)) for context, conts in groups for ids in conts]

    def per_choice():
        return scoring.score_sequences(
            setup.graphdef,
            params,
            seqs,
            seq_len=seq_len,
            batch_size=_BATCH.value,
            mesh_rules=setup.mesh_rules,
        )

    def shared():
        return choices.score_continuations(
            setup.graphdef,
            params,
            groups,
            seq_len=seq_len,
            batch_size=_BATCH.value,
            mesh_rules=setup.mesh_rules,
        )

    t_old, old = timing.best_of(per_choice, _REPEATS.value)
    t_new, new = timing.best_of(shared, _REPEATS.value)
    acc_old = choices.accuracies(examples, old.logprob, old.tokens)
    acc_new = choices.accuracies(examples, new.logprob, new.tokens)
    context_tokens = sum(len(c) for c, _ in groups)
    choice_tokens = sum(len(ids) for _, conts in groups for ids in conts)
    n = len(examples)
    k = _CHOICES.value
    print(
        f"{config.model.d_model}d x {config.model.n_layers} layers, vocab {tok.vocab_size}, "
        f"{n} questions x {k} choices, {_CONTEXT.value} context lines (mean context "
        f"{context_tokens / n:.1f} tokens, choice {choice_tokens / n / k:.1f}), "
        f"{jax.devices()[0].platform}"
    )
    print(
        f"per choice: {n / t_old:8.1f} examples/s ({t_old:.3f} s; "
        f"{sum(len(s) - 1 for s, _ in seqs):,} input tokens)"
    )
    shared_tokens = context_tokens + choice_tokens - len(seqs)
    print(
        f"shared:     {n / t_new:8.1f} examples/s ({t_new:.3f} s; {shared_tokens:,} input "
        f"tokens)  speed-up {t_old / t_new:.2f}x"
    )
    diff = float(np.abs(new.logprob - old.logprob).max())
    print(f"max |logprob diff| {diff:.2e}; accuracies equal: {acc_old == acc_new} ({acc_new})")


if __name__ == "__main__":
    from jaxlm import cli

    cli.run_cli(main)
