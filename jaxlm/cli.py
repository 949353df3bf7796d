"""The one start-up of every command (jaxlm.main, tools/, benchmarks/): absl flags, errors
for people.

`run_cli(main)` parses the flags with absl and runs `main(argv)`; a `JaxlmError` leaves as one
`error: ...` line (exit status 1), Ctrl-C as one line (130), a bad `--config.x` override as one
`error:` line. `call(main, flag_values, argv)` runs the same command in this process and returns
its exit status (tests, notebooks).
"""

import ast
import contextlib
import importlib.util
import os
import platform
import sys
from collections.abc import Callable, Iterator

from absl import app, flags

from jaxlm.errors import JaxlmError

_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")
Main = Callable[[list[str]], int | None]  # positional arguments (argv[0] the program) -> status

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


@contextlib.contextmanager
def errors_are_one_line() -> Iterator[None]:
    """A `JaxlmError` inside prints `error: <message>` alone on stderr and exits 1.

    Anything else is a bug and keeps its traceback; JAXLM_TRACEBACK=1 keeps it for these too.
    """
    try:
        yield
    except JaxlmError as e:
        if os.environ.get("JAXLM_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def run_cli(
    main_fn: Main, flag_values: flags.FlagValues | None = None, *, require_config: bool = True
) -> None:
    """`app.run(main_fn)` with errors for people: the entry of every command.

    Args:
      main_fn: the command; gets the positional arguments (argv[0] the program), returns the
        exit status (None = 0).
      flag_values: the command's own flags, when they are not on absl's global FLAGS. Commands
        that tests call in this process (`call`) keep their flags apart, since two of them may
        both define `--workdir`; here they join FLAGS, so `--help` and `--flagfile` see them.
      require_config: `--config` is required; commands reading a workdir or a model directory
        take none, and some take it only for some work (prepare_data's --list does not).
    """
    if flag_values is not None:
        flags.FLAGS.append_flag_values(flag_values)
        for module, module_flags in flag_values.flags_by_module_dict().items():
            for flag in module_flags:  # listed by --help as the command's own flags
                flags.FLAGS.register_flag_by_module(module, flag)

    def main(argv: list[str]) -> int | None:
        if flag_values is not None:
            flag_values.mark_as_parsed()  # absl parsed these flags as members of FLAGS
        with errors_are_one_line():
            return main_fn(argv)

    if require_config:
        flags.mark_flag_as_required("config")
    try:
        with ctrl_c_is_one_line():
            app.run(main)
    except SystemExit as e:
        # absl prints the usage (the module docstring and flags) for --help, then exits 1:
        # asking for help is not a failure.
        if e.code == 1 and any(a in _HELP_FLAGS for a in sys.argv[1:]):
            sys.exit(0)
        raise
    except (AttributeError, KeyError) as e:  # raised by --config.x overrides naming unknown keys
        if not any(a.startswith("--config.") for a in sys.argv[1:]):
            raise
        message = _readable(e)
        hint = "" if "Did you mean" in message else _existing_keys(sys.argv)
        sys.exit(f"error: bad --config override: {message}{hint}")


def call(main_fn: Main, flag_values: flags.FlagValues, argv: list[str]) -> int:
    """Runs a command in this process as `run_cli` runs it from a shell; returns its exit status.

    Flags not in `argv` take their defaults (not values left by an earlier call); a flag that
    does not parse, and a `JaxlmError`, are one `error:` line on stderr and status 1.

    Args:
      main_fn, flag_values: the command's main and its own flags (see `run_cli`).
      argv: the arguments after the program name, as typed in a shell.
    """
    flag_values.unparse_flags()
    try:
        positional = flag_values([main_fn.__module__, *argv])
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    try:
        with errors_are_one_line():
            return main_fn(positional) or 0
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("message"), as Python prints it
            print(e.code, file=sys.stderr, flush=True)
            return 1
        return e.code or 0


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
