"""A broken install fails the suite, naming the package: nothing the [test] extra installs is
imported behind `pytest.importorskip`, so a missing or unimportable package is a red test, never a
green skip.
"""

import importlib.util
import os
import re
import subprocess
import sys

from tests.helpers import REPO

# Import names that differ from the requirement's name. torch is not listed in the extra but
# comes with it (accelerate requires it); README's test command pins its CPU build first.
IMPORT_NAMES = {
    "jax[tpu]": "libtpu",
    "apache-beam": "apache_beam",
    "lm-eval": "lm_eval",
    "moto[server]": "moto",
}
BROUGHT_IN = ["torch", "boto3"]  # boto3 (tests/test_storage.py's bucket admin) comes with moto


def extra_requirements() -> list[str]:
    """The requirement names of pyproject.toml's [test] extra, without version bounds."""
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        block = re.search(r"^test = \[(.*?)^\]", f.read(), re.M | re.S).group(1)
    quoted = re.findall(r'"([^"]+)"', re.sub(r"#.*", "", block))  # comments dropped first
    return [re.split(r"[<>=!~ ]", req)[0] for req in quoted]


def test_every_package_of_the_test_extra_is_installed():
    requirements = extra_requirements()
    assert {"transformers", "apache-beam", "nbclient", "lm-eval", "jax[tpu]"} <= set(requirements)
    modules = [IMPORT_NAMES.get(r, r.replace("-", "_")) for r in requirements] + BROUGHT_IN
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    assert not missing, f"the [test] extra is not fully installed, missing: {', '.join(missing)}"


def test_a_hidden_test_extra_package_fails_the_tests_that_need_it_by_name():
    # nbclient made unimportable, as a broken or partial install leaves it; collection alone
    # shows whether the notebook tests would run, skip or fail.
    hide = (
        "import sys; sys.modules['nbclient'] = None; import pytest; "
        "sys.exit(pytest.main(['-q', '--collect-only', '-p', 'no:cacheprovider', "
        "'tests/test_notebooks.py']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", hide], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-2000:]
    assert any("ModuleNotFoundError" in line and "nbclient" in line for line in text.splitlines())
    assert "skipped" not in text, text[-2000:]
