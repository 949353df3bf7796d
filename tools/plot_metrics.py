"""Draw a run's dashboard (or several runs overlaid) from their metrics.jsonl as one PNG.

    python tools/plot_metrics.py runs/tiny [runs/other ...] [--out=dashboard.png]

Panels: train and held-out loss (loss spikes marked), learning rate, gradient norm, throughput,
downstream accuracy (`eval/<task>/accuracy`, chance level dashed) and bits per byte: held-out
(solid), each dataset's held-out split and each named validation set (`eval/<name>/bits_per_byte`,
dashed and dotted; a dataset's line is left out when it is the held-out line itself, i.e. the
run has one dataset) and gzip -9 on the same held-out text (`eval/gzip_bits_per_byte`, gray);
the x axis is tokens seen (step x train.batch_size x train.seq_len from each run's config.json,
or steps when a config is missing). A run with `config.stages` also gets its stage boundaries
marked (dotted lines) on every panel and a row of its planned schedules: batch size, sequence
length and mixture weights per step. A mixture-of-experts run (`train/moe_*` metrics) gets a
row of its routers: the load-balance loss (solid) and router z-loss (dashed), the busiest
expert's load over the mean (1 is perfect balance) and the fraction of assignments dropped (0
when dropless). A run that wrote a goodput breakdown (`goodput/<category>_s`,
at its end) gets a last row: where its wall time went, one stacked bar per run, cumulative over
its restarts. Needs matplotlib: pip install 'jaxlm[plot]'.
Default output: <first workdir>/metrics.png.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import flags

from jaxlm import cli, goodput, storage
from jaxlm.errors import JaxlmError

FLAGS = flags.FlagValues()  # this command's own: tests call it beside others (cli.call)
_OUT = flags.DEFINE_string(
    "out", None, "PNG path (default: <first workdir>/metrics.png).", flag_values=FLAGS
)

Series = dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (steps, values), sorted by step
_TASK_KEY = re.compile(r"^eval/(.+)/accuracy$")
_BPB_KEY = re.compile(r"^eval/(.+)/bits_per_byte$")  # per dataset and per validation set
# An MoE model's router statistics, as jaxlm.train names them (MOE_METRICS), by panel.
_MOE_PANELS = (
    ("router losses", "loss (log scale)", ("moe_balance_loss", "moe_z_loss")),
    ("expert load: busiest / mean", "max / mean load (1: balanced)", ("moe_load_max_over_mean",)),
    ("assignments dropped", "fraction dropped", ("moe_dropped",)),
)


def read_metrics(workdir: str) -> Series:
    """Every scalar in `<workdir>/metrics.jsonl` as (steps, values) arrays per key.

    A step logged twice (a run resumed from an earlier checkpoint) keeps its last value; a
    malformed line (e.g. a crash mid-write) is skipped.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise JaxlmError(f"{path} does not exist; pass the --workdir of a run.")
    by_key: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            for key, value in record.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    by_key.setdefault(key, {})[step] = float(value)
    out = {}
    for key, points in by_key.items():
        steps = np.array(sorted(points))
        out[key] = (steps, np.array([points[s] for s in steps]))
    return out


def tokens_per_step(workdir: str) -> int | None:
    """train.batch_size x train.seq_len from `<workdir>/config.json`, or None without one."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            train = json.load(f)["train"]
        return int(train["batch_size"]) * int(train["seq_len"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def stage_plan(workdir: str) -> Any:
    """The `jaxlm.stages.Plan` of a run with `config.stages` (from its config.json), else None."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if not config.get("stages"):
        return None
    import ml_collections

    from jaxlm import stages  # imports jax: only for staged runs

    try:
        return stages.build(ml_collections.ConfigDict(config))
    except (JaxlmError, KeyError, TypeError, ValueError, AttributeError):
        return None


def _tokens_at(workdir: str, plan: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    """steps -> tokens seen: exact across a staged run's changes of batch and length."""
    if plan is not None:
        return lambda steps: np.array([plan.tokens_before(int(s)) for s in steps], np.float64)
    scale = tokens_per_step(workdir)
    return None if scale is None else (lambda steps: np.asarray(steps) * scale)


def _planned(plan: Any, value: Callable) -> tuple[np.ndarray, np.ndarray]:
    """(steps, value(stage)) at every step of a plan, for a step plot."""
    steps = np.arange(plan.total_steps + 1)
    return steps, np.array([value(plan.stage_at(max(int(s) - 1, 0))) for s in steps], np.float64)


def find_spikes(
    values: np.ndarray, window: int = 10, rel: float = 0.05, n_sigma: float = 6.0
) -> np.ndarray:
    """Indices of points that jump above the median of the `window` points before them.

    The margin is the larger of `rel` x |median| and `n_sigma` times the noise of those points,
    estimated robustly from their successive differences (so a steep but smooth fall early in
    training does not count as noise); a falling curve never triggers, only upward jumps.
    """
    values = np.asarray(values, np.float64)
    spikes = []
    for i in range(window, len(values)):
        past = values[i - window : i]
        past = past[np.isfinite(past)]
        if len(past) < 3 or not np.isfinite(values[i]):
            continue
        median = np.median(past)
        noise = 1.4826 * np.median(np.abs(np.diff(past))) / np.sqrt(2)  # MAD of differences -> std
        if values[i] > median + max(rel * abs(median), n_sigma * noise):
            spikes.append(i)
    return np.asarray(spikes, np.int64)


def _labels(workdirs: list[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def plot(workdirs: list[str], out: str) -> str:
    """Draws the dashboard of `workdirs` (overlaid) into the PNG `out`; returns `out`."""
    fig = dashboard(workdirs)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def dashboard(workdirs: list[str]) -> Any:
    """The matplotlib Figure of `workdirs`' dashboard (overlaid runs)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import EngFormatter, FormatStrFormatter
    except ImportError:
        raise JaxlmError("plotting needs matplotlib: pip install 'jaxlm[plot]'.") from None

    runs = [read_metrics(w) for w in workdirs]
    plans = [stage_plan(w) for w in workdirs]
    token_maps = [_tokens_at(w, p) for w, p in zip(workdirs, plans, strict=True)]
    use_tokens = all(t is not None for t in token_maps)  # one x axis for all runs, or steps
    x_label = "tokens seen" if use_tokens else "step"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    staged = any(p is not None for p in plans)  # a third row: the planned schedules
    routed = any("train/moe_balance_loss" in run for run in runs)  # a row of router panels
    accounted = any("goodput/wall_s" in run for run in runs)  # a last row: the goodput bars
    rows = (3 if staged else 2) + routed + accounted
    fig, axes = plt.subplots(rows, 3, figsize=(16, 4.25 * rows), dpi=100, sharex=True)
    if accounted:  # one wide panel of its own x axis (seconds) in place of the last row
        for ax in axes[-1]:
            ax.remove()
        _draw_goodput(fig.add_subplot(axes[0, 0].get_gridspec()[-1, :]), runs, _labels(workdirs))
        axes = axes[:-1]
        for ax in axes[-1]:  # now the bottom row of the shared x axis: its tick labels back
            ax.xaxis.set_tick_params(labelbottom=True)
    ax_loss, ax_lr, ax_grad, ax_tput, ax_acc, ax_bpb = axes.ravel()[:6]
    titles = {
        ax_loss: "loss (x spike, | skipped step)",
        ax_lr: "learning rate",
        ax_grad: "gradient norm",
        ax_tput: "throughput (tokens/s)",
        ax_acc: "downstream accuracy",
        ax_bpb: "bits per byte (held-out, per set)",
    }
    if staged:
        ax_batch, ax_len, ax_mix = axes[2]
        titles.update(
            {
                ax_batch: "batch size (sequences per step)",
                ax_len: "sequence length (tokens)",
                ax_mix: "mixture weights",
            }
        )
    y_labels = {
        ax_loss: "loss (nats/token, log scale)",
        ax_lr: "learning rate",
        ax_grad: "global gradient norm (log scale)",
        ax_tput: "tokens/s",
        ax_acc: "accuracy",
        ax_bpb: "bits per byte (lower is better)",
    }
    if staged:
        y_labels.update({ax_batch: "sequences", ax_len: "tokens", ax_mix: "weight"})
    moe_axes = dict(zip(axes[2 + staged], _MOE_PANELS, strict=True)) if routed else {}
    for ax, (title, y_label, _) in moe_axes.items():
        titles[ax], y_labels[ax] = title, y_label
    drawn: dict[Any, bool] = dict.fromkeys(titles, False)

    def line(ax, series: Series, key: str, to_x: Callable | None, color: str, **kw) -> bool:
        if key not in series:
            return False
        steps, values = series[key]
        ax.plot(to_x(steps) if use_tokens else steps, values, color=color, **kw)
        drawn[ax] = True
        return True

    chance_drawn: set[tuple[str, float]] = set()
    for run, scale, plan, label, color in zip(
        runs, token_maps, plans, _labels(workdirs), itertools.cycle(colors)
    ):
        if line(ax_loss, run, "train/loss", scale, color, lw=1.2, label=f"{label} train"):
            steps, values = run["train/loss"]
            spikes = find_spikes(values)
            if len(spikes):
                ax_loss.scatter(
                    scale(steps[spikes]) if use_tokens else steps[spikes],
                    values[spikes],
                    marker="x",
                    s=60,
                    color="red",
                    zorder=3,
                )
        line(
            ax_loss,
            run,
            "eval/loss",
            scale,
            color,
            lw=1.2,
            ls="--",
            marker="o",
            ms=4,
            label=f"{label} val",
        )
        if (
            "train/skipped" in run
        ):  # steps the trainer skipped (non-finite loss): ticks at the bottom
            steps, skipped = run["train/skipped"]
            hit = steps[skipped > 0]
            hit = scale(hit) if use_tokens else hit
            ax_loss.plot(
                hit,
                np.zeros_like(hit),
                "|",
                color=color,
                ms=12,
                transform=ax_loss.get_xaxis_transform(),
            )
        line(ax_lr, run, "train/lr", scale, color, label=label)
        line(ax_grad, run, "train/grad_norm", scale, color, lw=0.8, label=label)
        line(ax_tput, run, "train/tokens_per_s", scale, color, label=label)
        line(ax_bpb, run, "eval/bits_per_byte", scale, color, marker="o", ms=4, label=label)
        if "eval/gzip_bits_per_byte" in run:
            gzip_bpb = run["eval/gzip_bits_per_byte"][1][-1]
            ax_bpb.axhline(gzip_bpb, color=color, ls="-", lw=3, alpha=0.3, label=f"{label} gzip -9")
        sets = [
            m.group(1)
            for m in map(_BPB_KEY.match, sorted(run))
            if m and not _same_series(run[m.group(0)], run.get("eval/bits_per_byte"))
        ]
        for name, style in zip(sets, itertools.cycle(["--", ":", "-."])):
            line(
                ax_bpb,
                run,
                f"eval/{name}/bits_per_byte",
                scale,
                color,
                ls=style,
                marker=".",
                ms=4,
                label=f"{label} {name}",
            )
        tasks = sorted(m.group(1) for m in map(_TASK_KEY.match, run) if m)
        for task, style in zip(tasks, itertools.cycle(["-", "--", ":", "-."])):
            line(
                ax_acc,
                run,
                f"eval/{task}/accuracy",
                scale,
                color,
                ls=style,
                marker="o",
                ms=4,
                label=f"{label} {task}",
            )
            if f"eval/{task}/chance" in run:
                chance = run[f"eval/{task}/chance"][1][-1]
                if (task, chance) not in chance_drawn:
                    chance_drawn.add((task, chance))
                    ax_acc.axhline(chance, color="gray", ls=":", lw=1, label=f"chance {task}")

        for ax, (_, _, keys) in moe_axes.items():
            for key, style in zip(keys, ("-", "--"), strict=False):
                name = key.removeprefix("moe_").replace("_", " ")
                line(ax, run, f"train/{key}", scale, color, ls=style, label=f"{label} {name}")
        if plan is not None:
            to_x = scale if use_tokens else None
            _draw_stages(plan, label, color, to_x, titles, drawn, tuple(axes[2]))

    for ax, title in titles.items():
        ax.set_title(title)
        ax.set_ylabel(y_labels[ax])
        if ax in axes[-1]:  # the x axis is shared; label the bottom row only
            ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        if use_tokens:
            ax.xaxis.set_major_formatter(EngFormatter())
        if drawn[ax]:
            ax.legend(fontsize=7)
        else:
            ax.text(
                0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray"
            )
    for ax, (_, _, keys) in moe_axes.items():
        if drawn[ax] and "moe_load_max_over_mean" in keys:
            ax.axhline(1.0, color="gray", ls=":", lw=1)  # perfect balance
    router_losses = [ax for ax, (_, _, keys) in moe_axes.items() if "moe_z_loss" in keys]
    for ax in (ax_loss, ax_grad, *router_losses):
        if drawn[ax]:
            ax.set_yscale("log")  # early values are orders of magnitude above the rest
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    fig.suptitle(" vs ".join(_labels(workdirs)))
    fig.tight_layout()
    return fig


def _draw_goodput(ax: Any, runs: list[Series], labels: list[str]) -> None:
    """One horizontal bar per run with a breakdown: its wall time split into goodput's
    categories (the last breakdown it wrote), each part labelled with its share."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    shown = [
        (run, label) for run, label in zip(runs, labels, strict=True) if "goodput/wall_s" in run
    ]
    for row, (run, _) in enumerate(shown):
        wall = run["goodput/wall_s"][1][-1]
        left = 0.0
        for (category, words), color in zip(
            goodput.CATEGORIES.items(), colors[: len(goodput.CATEGORIES)], strict=True
        ):
            seconds = run.get(f"goodput/{category}_s", (None, [0.0]))[1][-1]
            ax.barh(row, seconds, left=left, color=color, label=words if row == 0 else None)
            if wall and seconds / wall >= 0.04:  # room for its label
                ax.text(left + seconds / 2, row, f"{seconds / wall:.0%}", ha="center", va="center")
            left += seconds
    ax.set_yticks(range(len(shown)), [label for _, label in shown])
    ax.set_xlabel("wall time (s), over every start of the run")
    ax.set_title("goodput: where the wall time went")
    ax.legend(
        fontsize=7, ncol=len(goodput.CATEGORIES), loc="upper center", bbox_to_anchor=(0.5, -0.25)
    )


def _same_series(a: tuple[np.ndarray, np.ndarray], b: tuple | None) -> bool:
    """Whether two (steps, values) series are one line (a run's only dataset is its total)."""
    return (
        b is not None
        and np.array_equal(a[0], b[0])
        and np.allclose(a[1], b[1], rtol=1e-9, atol=0.0)
    )


def _draw_stages(
    plan: Any,
    label: str,
    color: str,
    to_x: Callable | None,
    titles: dict,
    drawn: dict,
    stage_axes: tuple[Any, Any, Any],
) -> None:
    """A staged run's boundaries on every panel of `titles`, and its planned batch, length and
    mixture in `stage_axes` (the third row)."""
    x = to_x or (lambda steps: np.asarray(steps))
    panels = list(titles)
    for stage in plan.stages[1:]:
        for ax in panels:
            ax.axvline(x([stage.start])[0], color=color, ls=":", lw=1)
    top = panels[0]
    for stage in plan.stages:
        top.text(
            x([stage.start])[0],
            1.0,
            f" {stage.name}",
            transform=top.get_xaxis_transform(),
            va="top",
            fontsize=7,
            color=color,
        )
    ax_batch, ax_len, ax_mix = stage_axes
    steps, batch = _planned(plan, lambda s: s.batch_size)
    ax_batch.step(x(steps), batch, where="post", color=color, label=label)
    steps, length = _planned(plan, lambda s: s.seq_len)
    ax_len.step(x(steps), length, where="post", color=color, label=label)
    names = sorted({n for s in plan.stages for n in s.weights})
    for name, style in zip(names, itertools.cycle(["-", "--", ":", "-."])):
        steps, weight = _planned(plan, lambda s, n=name: s.weights.get(n, 0.0))
        ax_mix.step(x(steps), weight, where="post", color=color, ls=style, label=f"{label} {name}")
    for ax in (ax_batch, ax_len, ax_mix):
        drawn[ax] = True


def main(argv: list[str]) -> int:
    """Draws the runs named by the positional arguments; prints the PNG's path."""
    workdirs = argv[1:]
    if not workdirs:
        raise JaxlmError("name at least one run directory, e.g. plot_metrics.py runs/tiny.")
    out = _OUT.value or storage.join(workdirs[0], "metrics.png")
    local_out = os.path.join(storage.local_root(), "plots", "metrics.png")
    plot([_readable(w) for w in workdirs], local_out if storage.is_remote(out) else out)
    if storage.is_remote(out):
        storage.write_bytes(out, storage.read_bytes(local_out))
    print(out)
    return 0


def _readable(workdir: str) -> str:
    """A local folder with the run's metrics.jsonl and config.json: the workdir itself, or for
    a bucket run a copy of those two files in a folder of the same name."""
    if not storage.is_remote(workdir):
        return workdir
    local = os.path.join(storage.local_copy_dir("plots", workdir), os.path.basename(workdir))
    os.makedirs(local, exist_ok=True)
    for name in ("metrics.jsonl", "config.json"):
        if storage.isfile(storage.join(workdir, name)):
            data = storage.read_bytes(storage.join(workdir, name))
            storage.write_bytes(os.path.join(local, name), data)
    return local


if __name__ == "__main__":
    cli.run_cli(main, FLAGS, require_config=False)
