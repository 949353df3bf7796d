"""Command start-up: the huge-pages restart keeps the arguments and the pid, and can be refused;
every command's flags, errors, Ctrl-C and exit status go through `cli.run_cli` (or `cli.call`)."""

import ast
import os
import subprocess
import sys

import pytest
from absl import flags

from jaxlm import cli
from jaxlm.errors import JaxlmError

SCRIPT = (
    "import os, sys; from jaxlm import cli; cli.restart_with_huge_pages(); "
    "print(os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])"
)


def start(env_extra: dict) -> tuple[int, str, list]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXLM_HUGE_PAGES")}
    env.update(env_extra)
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, "--config.x=1", "two words"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    pid, rest = out.strip().split(" ", 1)
    tunables, args = rest.split(" ", 1)
    assert int(pid) == proc.pid  # exec replaces the process: signals still reach the same pid
    return tunables, ast.literal_eval(args)


def thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.skipif("[madvise]" not in thp_mode(), reason="needs Linux THP in madvise mode")
def test_restart_turns_on_huge_pages_once_and_keeps_arguments_and_other_tunables():
    tunables, args = start({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    assert tunables == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
    assert args == ["--config.x=1", "two words"]


def test_restart_can_be_turned_off():
    tunables, args = start({"JAXLM_HUGE_PAGES": "0"})
    assert tunables == ""
    assert args == ["--config.x=1", "two words"]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = """
import sys
from absl import flags
from jaxlm import cli
from jaxlm.errors import JaxlmError

FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory.", flag_values=FLAGS)


def main(argv):
    if argv[1:] == ["interrupt"]:
        raise KeyboardInterrupt
    if not _WORKDIR.value:
        raise JaxlmError("say --workdir.")
    print(_WORKDIR.value, argv[1:])
    return 3


if __name__ == "__main__":
    cli.run_cli(main, FLAGS, require_config=False)
"""


def run_command(tmp_path, *args, **env):
    script = tmp_path / "command.py"
    script.write_text(COMMAND)
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": REPO, **env},
    )


def test_a_command_gets_its_own_flags_positionals_and_exit_status(tmp_path):
    r = run_command(tmp_path, "sub", "--workdir", "runs/a")  # `--flag value` works too
    assert (r.returncode, r.stdout) == (3, "runs/a ['sub']\n")
    r = run_command(tmp_path, "--help")
    assert r.returncode == 0 and "--workdir: A run directory." in r.stdout


def test_a_jaxlm_error_and_ctrl_c_are_one_line_unless_tracebacks_are_asked_for(tmp_path):
    r = run_command(tmp_path)
    assert (r.returncode, r.stderr) == (1, "error: say --workdir.\n")
    r = run_command(tmp_path, "interrupt", "--workdir=w")
    assert (r.returncode, r.stderr) == (130, "stopped by Ctrl-C.\n")
    r = run_command(tmp_path, JAXLM_TRACEBACK="1")
    assert (
        r.returncode == 1 and "Traceback" in r.stderr and "JaxlmError: say --workdir." in r.stderr
    )


def test_call_runs_a_command_in_process_with_defaults_for_flags_it_omits(capsys):
    flag_values = flags.FlagValues()
    workdir = flags.DEFINE_string("workdir", None, "A run directory.", flag_values=flag_values)
    seen = []

    def main(argv):
        if workdir.value is None:
            raise JaxlmError("say --workdir.")
        seen.append((workdir.value, argv[1:]))

    assert cli.call(main, flag_values, ["--workdir=a", "x"]) == 0
    assert cli.call(main, flag_values, []) == 1  # not the value the first call left
    assert capsys.readouterr().err == "error: say --workdir.\n"
    assert cli.call(main, flag_values, ["--nope=1"]) == 1
    assert capsys.readouterr().err.startswith("error: Unknown command line flag 'nope'")
    assert seen == [("a", ["x"])]
