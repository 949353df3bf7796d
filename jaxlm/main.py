"""Train (or resume) a run: `python -m jaxlm.main --config=configs/tiny.py [--workdir=DIR]`.

Override any config value with `--config.<key>=<value>` (e.g. `--config.train.steps=100`); a key
that does not exist is an error, not a silent new field. See every key, its value, its default
and its meaning with
    python -m jaxlm.main --config=configs/tiny.py --list_config
Running the command again resumes from the newest checkpoint in the workdir (runs/<config
name> by default); on a finished run it prints the final figures and exits.
"""

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from jaxlm import cli
from jaxlm.errors import PeerLost

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (e.g. configs/tiny.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
_LIST_CONFIG = flags.DEFINE_bool(
    "list_config", False, "Print every config key with its value, default and meaning; no run."
)


def main(argv):
    del argv
    config = _CONFIG.value
    if _LIST_CONFIG.value:
        from jaxlm import config_help

        path = config_flags.get_config_filename(flags.FLAGS["config"])
        print(config_help.listing(config, path, config_help.base_defaults()))
        return
    from jaxlm import loop  # after flag parsing: grain workers need absl flags parsed first

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO: keep stdout readable
    workdir = _WORKDIR.value or os.path.join("runs", config.name)
    # Ctrl-C outside the training loop, or a second one inside it; the rest of the errors are
    # cli.run_cli's, except a lost peer (see PeerLost).
    with cli.ctrl_c_is_one_line("stopped by Ctrl-C; checkpoints already written are kept."):
        try:
            loop.run(config, workdir)
        except PeerLost as e:
            if os.environ.get("JAXLM_TRACEBACK"):
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)


def run():
    cli.restart_with_huge_pages()  # faster steps on CPU hosts; see its docstring
    cli.run_cli(main)


if __name__ == "__main__":
    run()
