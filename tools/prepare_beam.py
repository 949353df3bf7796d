"""Prepare a corpus on Apache Beam: the same shards and manifest as tools/prepare_data.py.

    pip install 'jaxlm[beam]'
    python tools/prepare_beam.py --config=configs/tiny.py      # DirectRunner, one worker per CPU
    python tools/prepare_beam.py --config=configs/tiny.py -- \\
        --runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_threading

Everything after ``--`` is a Beam pipeline option, so any runner works; the output then goes to
an object store Beam can write (see docs/beam.md):

    python tools/prepare_beam.py --config=configs/tiny.py \\
        --config.data.datasets.stdlib.paths='/gcs/corpus/*.jsonl.zst' \\
        --output=gs://BUCKET/jaxlm/prepared -- \\
        --runner=DataflowRunner --project=PROJECT --region=REGION \\
        --temp_location=gs://BUCKET/tmp --requirements_file=requirements-beam.txt

Without ``--output`` the data goes where ``prepare`` caches it, so a training run with the same
config finds it ("using prepared data at ...").
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags

# Config files do `from configs import base`; make the repository root importable from anywhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ml_collections import config_flags  # noqa: E402

from jaxlm import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_OUTPUT = flags.DEFINE_string(
    "output", "", "Output folder (local, gs://, s3://); default: the local prepare cache."
)
DEFAULT_BEAM_ARGS = [  # 0 workers: one per CPU; processes: the tested mode (docs/perf.md)
    "--runner=DirectRunner",
    "--direct_num_workers=0",
    "--direct_running_mode=multi_processing",
]
# Workers' own log lines (about 20 per worker at INFO); failures still raise. A user's own
# --default_sdk_harness_log_level wins.
_QUIET_WORKERS = "--default_sdk_harness_log_level=CRITICAL"


def beam_args(user_args: list[str]) -> list[str]:
    """The pipeline options to run with: the user's (or the defaults), with quiet workers."""
    args = list(user_args or DEFAULT_BEAM_ARGS)
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        args.append(_QUIET_WORKERS)
    return args


def main(argv: list[str]) -> None:
    from jaxlm.data import beam

    config = _CONFIG.value
    # absl shows INFO logs, and Beam relays every worker's log lines (with the traceback of a
    # step that raised) through its own loggers: keep its warnings, and let a failed step reach
    # the user as one `error:` sentence (or as the exception, for anything not a JaxlmError).
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
    path = beam.prepare_beam(
        config.data, config.tokenizer, beam_args(argv[1:]), output=_OUTPUT.value
    )
    print(path)


if __name__ == "__main__":
    cli.run_cli(main)
