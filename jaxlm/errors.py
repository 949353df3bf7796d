"""The one exception family whose messages are written for people.

`jaxlm.main` and the tools print a `JaxlmError` as a single `error: ...` line (no traceback);
anything else is a bug and keeps its traceback.
"""


class JaxlmError(Exception):
    """Bad input or an impossible request: the message says what was wrong and what to do."""


class ConfigError(JaxlmError, ValueError):
    """A config value that cannot work, named by its key."""


class ConvertError(JaxlmError):
    """A model directory or checkpoint that cannot be converted; the message names the cause."""


class TokenizerMismatch(JaxlmError):
    """A tokenizer other than the one the data or checkpoint was made with (see
    `jaxlm.data.tokenizer.check_same`)."""


class PeerLost(JaxlmError):
    """Another process of a multi-process run died: this one must exit without waiting for it.

    `jaxlm.main` leaves through `os._exit`: jax's exit handler would otherwise wait at a
    shutdown barrier for the dead process until the heartbeat timeout, then abort with a dump.
    """
