"""Shared start-up for absl command lines that take a `--config` file."""

import ast
import contextlib
import importlib.util
import os
import platform
import sys
from collections.abc import Iterator

from absl import app, flags

_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def restart_with_huge_pages() -> None:
    """Restarts this command once with glibc's malloc asking for transparent huge pages.

    XLA:CPU allocates each step's temporary buffers (about 0.9 GB for configs/tiny.py) afresh;
    glibc serves allocations that large with mmap and the kernel faults them in 4 KiB at a
    time, every step: on the tiny run a sixth of all CPU time went to page faults. With the
    tunable glibc marks those mappings for 2 MiB pages. It must be set before the process
    starts, hence the exec. Only on glibc Linux with THP in `madvise` mode (with `always` it is
    already on, with `never` it cannot be); JAXLM_HUGE_PAGES=0 turns it off.
    """
    if (
        sys.platform != "linux"
        or os.environ.get("JAXLM_HUGE_PAGES") == "0"
        or "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", "")
        or platform.libc_ver()[0] != "glibc"
    ):
        return
    try:
        with open(_THP_SETTING) as f:
            if "[madvise]" not in f.read():
                return
    except OSError:
        return
    tunables = [os.environ.get("GLIBC_TUNABLES"), _HUGE_PAGES_TUNABLE]
    os.environ["GLIBC_TUNABLES"] = ":".join(t for t in tunables if t)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


@contextlib.contextmanager
def ctrl_c_is_one_line(message: str = "stopped by Ctrl-C.") -> Iterator[None]:
    """Ctrl-C inside prints `message` alone (no traceback) and exits 130, as shells expect.

    JAXLM_TRACEBACK=1 keeps the traceback, for debugging a hang.
    """
    try:
        yield
    except KeyboardInterrupt:
        if os.environ.get("JAXLM_TRACEBACK"):
            raise
        print(message, file=sys.stderr, flush=True)
        sys.exit(130)


def run_cli(main_fn) -> None:
    """`app.run(main_fn)` with --config required, a bad override as one `error:` line and
    Ctrl-C as one line."""
    flags.mark_flag_as_required("config")
    try:
        with ctrl_c_is_one_line():
            app.run(main_fn)
    except (AttributeError, KeyError) as e:  # raised by --config.x overrides naming unknown keys
        message = _readable(e)
        hint = "" if "Did you mean" in message else _existing_keys(sys.argv)
        sys.exit(f"error: bad --config override: {message}{hint}")


def _existing_keys(argv: list[str]) -> str:
    """'; datasets are: a, b' for the section of the first override that names a key the config
    lacks (the unknown name alone does not say what to write instead), or '' if none is found."""
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    path, _, arg = config_arg.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_config_for_error", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(arg) if arg else module.get_config()
    except Exception:  # noqa: BLE001 - only a hint: the override's error is printed regardless
        return ""
    for override in argv:
        if not override.startswith("--config."):
            continue
        node, section = config, "config"
        for key in override.removeprefix("--config.").split("=", 1)[0].split("."):
            if not hasattr(node, "keys") or key not in node:
                if hasattr(node, "keys"):
                    return f"; {section} are: {', '.join(sorted(node.keys()))}"
                break
            node, section = node[key], key if key == "datasets" else f"{key}'s keys"
    return ""


def _readable(e: Exception) -> str:
    """ml_collections nests a repr of the KeyError in its message; unwrap it to one line."""
    message = str(e.args[0] if e.args else e)
    while len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
        try:
            message = ast.literal_eval(message)
        except (ValueError, SyntaxError):
            break
    return " ".join(message.replace("\n", " ").split())
