"""README.md is the entry point: short, the two commands first, and every longer topic a page
under docs/ that it links to (and that exists)."""

import glob
import os
import re

from tests.helpers import REPO


def _readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_is_short_and_opens_with_the_two_commands():
    text = _readme()
    assert len(text.splitlines()) <= 90
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    commands = [line for line in first_block if not line.startswith("#")]
    assert len(commands) == 2 and "jaxlm.main --config=configs/tiny.py" in commands[0]
    # .ci/run runs the test command it finds with this pattern: it must be README's second one.
    assert re.match(r"^python3 -m venv .venv .*pytest", commands[1])


def test_every_docs_page_is_linked_from_the_readme_and_every_link_resolves():
    links = re.findall(r"\]\(((?:docs|colab|configs|tools)/[^)#\s]+)(?:#[^)]*)?\)", _readme())
    for link in links:
        assert os.path.exists(os.path.join(REPO, link)), f"README links a missing {link}"
    pages = {os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))}
    assert {"docs/usage.md", "docs/beam.md", "docs/guarantees.md", "docs/perf.md"} <= pages
    assert pages <= set(links), f"docs pages the README does not link: {pages - set(links)}"
