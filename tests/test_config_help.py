"""`--list_config`: every config key with its value, default and meaning (the files' comments)."""

import os
import subprocess
import sys

from configs import base, tiny
from jaxlm import config_help

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_base_key_has_its_default_and_a_meaning():
    config = base.get_config()
    rows = {
        key: (value, meaning)
        for key, value, meaning in config_help.rows(config, f"{REPO}/configs/base.py")
    }
    leaves = dict(config_help._leaves(config))
    assert set(rows) == set(leaves) and len(leaves) > 100
    for key, (value, meaning) in rows.items():
        assert value == repr(leaves[key]), key
        assert meaning.strip(), f"{key} has no comment in configs/base.py or its builders"
    # From the line's own comment, from a builder in another module, from the block above,
    # and from the section for keys built in a loop.
    assert rows["model.d_model"][1] == "D, residual stream width"
    assert rows["data.curation.pii.ip"][1] == "IPv4 and IPv6 addresses -> <IP>"
    assert rows["objectives.mask_rate"][1] == "masked: share of tokens to predict"
    assert rows["branch"][1].startswith("With init_from='ckpt:...'")
    assert rows["optim.groups.vector.wd_scale"][1].startswith("Parameter groups:")


def test_a_recipe_shows_its_value_the_default_and_its_own_note():
    rows = {
        key: (value, meaning)
        for key, value, meaning in config_help.rows(
            tiny.get_config(), f"{REPO}/configs/tiny.py", base.get_config()
        )
    }
    assert rows["train.steps"][0] == f"{tiny.get_config().train.steps} (default 1000)"
    assert rows["train.steps"][1].startswith("optimizer steps [tiny.py: the time 205 steps took")
    assert rows["model.head_dim"][0] == "64"  # the same as the default: no "(default ...)"


def test_help_exits_zero_and_points_to_the_listing():
    help_out = subprocess.run(
        [sys.executable, "-m", "jaxlm.main", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert help_out.returncode == 0, help_out.stderr
    assert "--config=configs/tiny.py --list_config" in help_out.stdout
    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm.main",
            "--config=configs/tiny.py",
            "--config.train.steps=7",
            "--list_config",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.startswith("train.steps = "))
    assert line.split("#")[0].strip() == "train.steps = 7 (default 1000)"
