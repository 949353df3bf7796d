"""Command start-up: the huge-pages restart keeps the arguments and the pid, and can be refused."""

import ast
import os
import subprocess
import sys

import pytest

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
