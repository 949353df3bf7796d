"""The metrics dashboard: a non-blank PNG of the right size for one run and for two overlaid,
spikes found where they are, and metrics.jsonl read the way a resumed run writes it."""

import json
import math

import numpy as np
from matplotlib import image

from jaxlm import cli
from tools import plot_metrics


def run_plot(argv: list[str]) -> int:
    """`python tools/plot_metrics.py ARGV` in this process; its exit status."""
    return cli.call(plot_metrics.main, plot_metrics.FLAGS, argv)


SPIKE_STEP = 300


def make_workdir(path, seed, steps=500, batch_size=16, seq_len=256, spike=True):
    """config.json and metrics.jsonl as train.run writes them: train/ every 10 steps, eval/ 100."""
    rng = np.random.RandomState(seed)
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"train": {"batch_size": batch_size, "seq_len": seq_len}})
    )
    lines = []
    for step in range(10, steps + 1, 10):
        loss = 1.5 + 7 * math.exp(-step / 60) + 0.02 * rng.randn()
        if spike and step == SPIKE_STEP:
            loss += 1.0
        lr = 3e-3 * min(step / 50, 0.5 * (1 + math.cos(math.pi * step / steps)))
        lines.append(
            {
                "step": step,
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": 0.3 + 2 * math.exp(-step / 80) + 0.05 * rng.rand(),
                "train/tokens_per_s": 9000 + 300 * rng.randn(),
                "train/skipped": float(step == 420),
            }
        )
        if step % 100 == 0:
            lines.append(
                {
                    "step": step,
                    "eval/loss": loss + 0.1,
                    "eval/bits_per_byte": (loss + 0.1) / 3,
                    "eval/next_line/accuracy": min(0.25 + step / 1000, 1.0),
                    "eval/next_line/chance": 0.25,
                }
            )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def read_png(path):
    pixels = image.imread(str(path))  # (H, W, 4) floats in [0, 1]
    assert pixels.shape == (850, 1600, 4)
    assert pixels[..., :3].var() > 0.001  # drawn on, not blank
    return pixels


def test_one_run_draws_a_non_blank_dashboard_in_its_workdir(tmp_path, capsys):
    wd = make_workdir(tmp_path / "tiny", seed=0)
    assert run_plot([str(wd)]) == 0
    assert capsys.readouterr().out.strip() == str(wd / "metrics.png")
    read_png(wd / "metrics.png")
    steps, loss = plot_metrics.read_metrics(str(wd))["train/loss"]
    assert steps[plot_metrics.find_spikes(loss)].tolist() == [SPIKE_STEP]  # the one marked in red


def test_two_runs_are_overlaid_in_one_png(tmp_path):
    a = make_workdir(tmp_path / "a", seed=0)
    b = make_workdir(tmp_path / "b", seed=1, batch_size=32, spike=False)
    assert run_plot([str(a), str(b), f"--out={tmp_path / 'compare.png'}"]) == 0
    assert run_plot([str(a), f"--out={tmp_path / 'alone.png'}"]) == 0
    both, alone = read_png(tmp_path / "compare.png"), read_png(tmp_path / "alone.png")
    assert not np.array_equal(both, alone)  # the second run adds lines
    assert not (a / "metrics.png").exists()


def test_spikes_are_found_only_where_the_loss_jumps():
    rng = np.random.RandomState(0)
    steps = np.arange(200)
    loss = 2 + 6 * np.exp(-steps / 20) + 0.02 * rng.randn(200)
    loss[[120, 170]] += [0.8, 0.4]
    assert plot_metrics.find_spikes(loss).tolist() == [120, 170]


def test_resumed_steps_keep_the_last_value_and_broken_lines_are_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 10, "train/loss": 5.0}\n{"step": 20, "train/loss": 4.0}\n'
        '{"step": 20, "train/loss": 3.5}\n{"step": 30, "train/lo'
    )
    steps, values = plot_metrics.read_metrics(str(tmp_path))["train/loss"]
    assert steps.tolist() == [10, 20] and values.tolist() == [5.0, 3.5]
    assert plot_metrics.tokens_per_step(str(tmp_path)) is None  # no config.json: x axis in steps


def test_a_workdir_without_metrics_is_one_error_line(tmp_path, capsys):
    assert run_plot([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}/metrics.jsonl does not exist; pass the --workdir of a run.\n"


def test_a_staged_run_gets_its_boundaries_and_planned_schedules(tmp_path):
    from tests.helpers import tiny_config

    config = tiny_config()
    config.train.steps = 0
    config.stages = (
        dict(name="short", steps=200, seq_len=16, batch_size=16),
        dict(name="long", steps=300, seq_len=64, batch_size=8),
    )
    wd = make_workdir(tmp_path / "staged", seed=0)
    (wd / "config.json").write_text(config.to_json_best_effort())
    plan = plot_metrics.stage_plan(str(wd))
    assert [s.start for s in plan.stages] == [0, 200]
    # x is tokens seen, exact across the change of shape: 200 x 16 x 16, then 8 x 64 per step.
    to_x = plot_metrics._tokens_at(str(wd), plan)
    assert to_x([200, 500]).tolist() == [51_200, 51_200 + 300 * 512]
    assert run_plot([str(wd)]) == 0
    pixels = image.imread(str(wd / "metrics.png"))
    assert pixels.shape == (1275, 1600, 4) and pixels[850:, :, :3].var() > 0.001  # third row


def test_bits_per_byte_panel_has_one_line_per_series_and_the_gzip_baseline(tmp_path):
    import matplotlib.pyplot as plt

    wd = make_workdir(tmp_path / "tiny", seed=0)
    records = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if "eval/bits_per_byte" in r:  # one dataset: its line is the held-out line itself
            r["eval/stdlib/bits_per_byte"] = r["eval/bits_per_byte"]
            r["eval/wiki/bits_per_byte"] = r["eval/bits_per_byte"] + 0.3  # a validation set
    records[-1]["eval/gzip_bits_per_byte"] = 1.607  # the final evaluation records the baseline
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    fig = plot_metrics.dashboard([str(wd)])
    ax_bpb = next(ax for ax in fig.axes if ax.get_title().startswith("bits per byte"))
    labels = [line.get_label() for line in ax_bpb.get_lines()]
    assert labels == ["tiny", "tiny gzip -9", "tiny wiki"]
    gzip_line = ax_bpb.get_lines()[1]
    assert set(gzip_line.get_ydata()) == {1.607}
    assert [ax.get_ylabel() for ax in fig.axes[:6]] == [
        "loss (nats/token, log scale)",
        "learning rate",
        "global gradient norm (log scale)",
        "tokens/s",
        "accuracy",
        "bits per byte (lower is better)",
    ]
    plt.close(fig)


def test_an_moe_run_gets_a_row_of_router_panels_and_a_dense_run_does_not(tmp_path):
    import matplotlib.pyplot as plt

    moe = make_workdir(tmp_path / "tiny_moe", seed=0)
    records = [json.loads(x) for x in (moe / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if "train/loss" in r:  # the router statistics the trainer logs with each train line
            r["train/moe_balance_loss"] = 2.0 + 1.0 / r["step"]
            r["train/moe_z_loss"] = 0.5
            r["train/moe_dropped"] = 0.0
            r["train/moe_load_max_over_mean"] = 1.0 + 10.0 / r["step"]
    (moe / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dense = make_workdir(tmp_path / "tiny", seed=1)

    fig = plot_metrics.dashboard([str(moe), str(dense)])
    router = {ax.get_title(): ax for ax in fig.axes[6:9]}
    assert list(router) == ["router losses", "expert load: busiest / mean", "assignments dropped"]
    labels = [line.get_label() for line in router["router losses"].get_lines()]
    assert labels == ["tiny_moe balance loss", "tiny_moe z loss"]  # the dense run has none
    balance = router["expert load: busiest / mean"].get_lines()
    assert balance[0].get_ydata()[0] == 2.0 and set(balance[-1].get_ydata()) == {1.0}  # 1: ideal
    plt.close(fig)
    fig = plot_metrics.dashboard([str(dense)])
    assert len(fig.axes) == 6  # no router row without router metrics
    plt.close(fig)
