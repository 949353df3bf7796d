"""Command-line entry point: `python -m jaxlm.main --config=configs/tiny.py [--workdir=DIR]`.

Config values can be overridden with `--config.train.steps=100` and the like; a key that does
not exist is an error, not a silent new field.
"""

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from jaxlm import cli
from jaxlm.errors import JaxlmError, PeerLost

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")


def main(argv):
    del argv
    from jaxlm import loop  # after flag parsing: grain workers need absl flags parsed first

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO: keep stdout readable
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", config.name)
    try:
        loop.run(config, workdir)
    except JaxlmError as e:
        if os.environ.get("JAXLM_TRACEBACK"):
            raise
        if isinstance(e, PeerLost):  # see its docstring
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, or a second one inside it
        if os.environ.get("JAXLM_TRACEBACK"):
            raise
        print("stopped by Ctrl-C; checkpoints already written are kept.", file=sys.stderr)
        sys.exit(130)


def run():
    cli.restart_with_huge_pages()  # faster steps on CPU hosts; see its docstring
    cli.run_cli(main)


if __name__ == "__main__":
    run()
