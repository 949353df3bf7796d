"""The one exception family whose messages are written for people.

`jaxlm.main` and the tools print a `JaxlmError` as a single `error: ...` line (no traceback);
anything else is a bug and keeps its traceback.
"""


class JaxlmError(Exception):
    """Bad input or an impossible request: the message says what was wrong and what to do."""


class ConfigError(JaxlmError, ValueError):
    """A config value that cannot work, named by its key."""
