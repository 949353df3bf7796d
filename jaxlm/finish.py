"""A run's end: the summary and the sample it prints when training ends, and, when the same
command is run again on a finished run, the one line that says so instead of evaluating again.

A run is finished when its newest checkpoint is at the plan's last step, was written with this
very config, and metrics.jsonl holds the final evaluation at that step (the final evaluation is
written after the last checkpoint: a run stopped during it is not finished, and a rerun
completes it). All of that is read from the workdir, before any data preparation or compile.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from jaxlm import checkpoint as ckpt_lib
from jaxlm import generate as generate_lib
from jaxlm import metrics as metrics_lib
from jaxlm.progress import format_duration


def completed_run(spec: Any, workdir: str) -> dict[str, Any] | None:
    """The summary of the finished run of `spec` (`jaxlm.spec.RunSpec`) in `workdir` (as
    `loop.run` returns it, with `already_complete=True` and `line`, the one line to print), or
    None if there is work left."""
    config, total = spec.config, spec.plan.total_steps
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = ckpt_lib.all_steps(ckpt_dir)
    if not steps or steps[-1] != total:
        return None
    records = _records_at(os.path.join(workdir, "metrics.jsonl"), total)
    final = _unprefixed(records, "eval/")
    if "bits_per_byte" not in final:  # the final evaluation did not finish (or has no loss)
        return None
    saved = ckpt_lib.read_step_meta(ckpt_dir, total).get("config")
    if saved != json.loads(config.to_json_best_effort()):  # another config: let the run decide
        return None
    train = _unprefixed(records, "train/")
    line = (
        f"run complete at step {total} in {workdir}; final figures: held-out "
        f"{metrics_lib.final_figures(final)}. Nothing to do: raise --config.train.steps to "
        "train further, or pass another --workdir to start a new run."
    )
    return dict(
        start_step=total,
        final_step=total,
        train_loss=train.get("loss"),
        wall_s=0.0,
        preempted=False,
        eval=final,
        gzip_bits_per_byte=final.get("gzip_bits_per_byte"),
        already_complete=True,
        line=line,
    )


def _records_at(path: str, step: int) -> list[dict[str, Any]]:
    """metrics.jsonl's records at `step`, in file order ([] without the file)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash mid-write
                continue
            if record.get("step") == step:
                out.append(record)
    return out


def _unprefixed(records: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """The `prefix` scalars of `records` without the prefix; a later record wins."""
    return {
        k.removeprefix(prefix): v for r in records for k, v in r.items() if k.startswith(prefix)
    }


def summary_text(
    summary: dict[str, Any],
    tokens: int,
    best_eval: tuple[int, float],
    first_eval: dict[str, float] | None,
    ckpt_dir: str,
    workdir: str,
) -> str:
    """The 'run summary:' lines printed when training ends: tokens, steps, time, losses, and
    where the checkpoints, metrics and plots are (with the install the viewers need, if absent)."""
    best_step, best_loss = best_eval
    train_loss = summary["train_loss"]
    train_loss = "-" if train_loss is None else f"{train_loss:.4f}"
    extra = " (first: pip install -e '.[plot]')"
    tb = "" if importlib.util.find_spec("tensorboard") else extra
    plot = "" if importlib.util.find_spec("matplotlib") else extra
    return (
        f"run summary: {tokens:,} tokens seen "
        f"(steps {summary['start_step']}-{summary['final_step']} "
        f"in {format_duration(summary['wall_s'])}) | final train loss "
        f"{train_loss} | best held-out loss {best_loss:.4f} at step {best_step}\n"
        f"{metrics_lib.before_after(first_eval, summary['eval'])}"
        f"  checkpoints: {ckpt_dir}\n"
        f"  metrics: {os.path.join(workdir, 'metrics.jsonl')} and "
        f"{os.path.join(workdir, 'tb')} (tensorboard --logdir {workdir}{tb})\n"
        f"  plots: python tools/plot_metrics.py {workdir}{plot}"
    )


def print_sample(setup: Any, params: Any, tokenizer: Any, out: Any) -> None:
    """The recipe's prompt continued by the trained model (config.sample), printed to `out`."""
    from jaxlm.data import tokenizer as tokenizer_lib

    s = setup.config.sample
    if s.max_tokens <= 0 or not s.prompt or setup.spec.objective == "masked":  # an encoder
        return
    last = setup.spec.plan.stages[-1]  # the model as last trained (its RoPE)
    new_tokens = generate_lib.generate(
        setup.graphdef_for(last),
        params,
        [tokenizer_lib.prompt_ids(tokenizer, s.prompt)],
        max_new_tokens=s.max_tokens,
        eos_id=tokenizer.eos_id,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        seed=setup.spec.seed,
        mesh_rules=setup.mesh_rules,
    )[0]
    out.print("sample (KV-cache decoding):\n" + s.prompt + tokenizer.decode(new_tokens))
