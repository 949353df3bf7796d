"""Shared start-up for absl command lines that take a `--config` file."""

import ast
import sys

from absl import app, flags


def run_cli(main_fn) -> None:
    """`app.run(main_fn)` with --config required and a bad override as one `error:` line."""
    flags.mark_flag_as_required("config")
    try:
        app.run(main_fn)
    except (AttributeError, KeyError) as e:  # raised by --config.x overrides naming unknown keys
        sys.exit(f"error: bad --config override: {_readable(e)}")


def _readable(e: Exception) -> str:
    """ml_collections nests a repr of the KeyError in its message; unwrap it to one line."""
    message = str(e.args[0] if e.args else e)
    while len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
        try:
            message = ast.literal_eval(message)
        except (ValueError, SyntaxError):
            break
    return " ".join(message.replace("\n", " ").split())
