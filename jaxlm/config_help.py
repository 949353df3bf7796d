"""Every config key with its value, its default and its meaning, read from the config files.

`python -m jaxlm.main --config=configs/tiny.py --list_config` prints it. The meanings are the
config files' own comments (`c.model.d_model = 512  # D, residual stream width`, or the comment
block just above an assignment), so they cannot drift from the code: `comments` parses a config
file and every module whose `get_config()` / `default_config()` builds part of it (e.g.
configs/base.py, jaxlm/objectives.py, jaxlm/data/curate.py). A key without a comment of its own
takes its section's (`optim.groups.matrix.lr_scale` that of `optim.groups`).
"""

from __future__ import annotations

import ast
import importlib.util
import io
import os
import tokenize
from typing import Any

_BUILDERS = ("get_config", "default_config")  # functions that build (part of) a config


def comments(path: str, prefix: str = "", function: str | None = None) -> dict[str, list[str]]:
    """{dotted key: [comments, deepest definition first]} from the config-building functions of
    the Python file `path` (or only `function`), with keys under `prefix`."""
    with open(path) as f:
        source = f.read()
    tree = ast.parse(source)
    line_comment = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    modules = _imported_modules(tree, path)
    out: dict[str, list[str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        if node.name != function and (function or node.name not in _BUILDERS):
            continue
        roots: dict[str, str] = {}  # local name -> the key it stands for ('' = the config)
        for stmt in ast.walk(node):
            if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
                continue
            target, value = stmt.targets[0], stmt.value
            called = _called_builder(value, modules)
            if isinstance(target, ast.Name):
                if called or _is_configdict(value):  # `c = base.get_config()` / ConfigDict()
                    roots[target.id] = ""
                    if called:
                        _merge(out, comments(called[0], prefix, called[1]))
                elif _key(value, roots) is not None:  # an alias: `q = c.quality`
                    roots[target.id] = _key(value, roots)
                continue
            key = _key(target, roots)
            if key is None:
                continue
            full = ".".join(filter(None, (prefix, key)))
            if called:  # `c.objectives = objectives.default_config()`
                _merge(out, comments(called[0], full, called[1]))
            text = _comment_of(stmt, line_comment, lines)
            if text:
                out.setdefault(full, []).append(text)
    return out


def _merge(into: dict[str, list[str]], other: dict[str, list[str]]) -> None:
    for key, texts in other.items():
        into.setdefault(key, []).extend(texts)


def _comment_of(stmt: ast.stmt, line_comment: dict[int, str], lines: list[str]) -> str:
    """The comment at the end of the statement's first line, or else the block just above it."""
    if stmt.lineno in line_comment and lines[stmt.lineno - 1].lstrip()[:1] != "#":
        return line_comment[stmt.lineno]
    block, line = [], stmt.lineno - 1
    while line >= 1 and lines[line - 1].lstrip().startswith("#"):
        block.insert(0, line_comment[line])
        line -= 1
    return " ".join(block)


def _key(node: ast.expr, roots: dict[str, str]) -> str | None:
    """'model.d_model' for `c.model.d_model` (or `c["model"].d_model`) when `c` is a root."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.insert(0, node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            parts.insert(0, str(node.slice.value))
            node = node.value
        else:
            break
    if not isinstance(node, ast.Name) or node.id not in roots:
        return None
    return ".".join(filter(None, (roots[node.id], *parts)))


def _is_configdict(value: ast.expr) -> bool:
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, (ast.Attribute, ast.Name))
        and getattr(value.func, "attr", getattr(value.func, "id", "")) == "ConfigDict"
    )


def _imported_modules(tree: ast.Module, path: str) -> dict[str, str]:
    """{local name: source file} of the modules `path` imports that can be found."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                origin = _origin(f"{node.module}.{alias.name}", path)
                if origin:
                    out[alias.asname or alias.name] = origin
        elif isinstance(node, ast.Import):
            for alias in node.names:
                origin = _origin(alias.name, path)
                if origin:
                    out[alias.asname or alias.name.split(".")[0]] = origin
    return out


def _origin(module: str, path: str) -> str | None:
    """The source file of `module`, looked up beside the config file's folder too."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec and spec.origin and spec.origin.endswith(".py"):
        return spec.origin
    # configs/tiny.py imports `configs.base`: the repository root is the file's grandparent.
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    candidate = os.path.join(root, *module.split(".")) + ".py"
    return candidate if os.path.isfile(candidate) else None


def _called_builder(value: ast.expr, modules: dict[str, str]) -> tuple[str, str] | None:
    """(file, function) for `module.get_config()` / `module.default_config()` calls."""
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr in _BUILDERS
        and isinstance(value.func.value, ast.Name)
        and value.func.value.id in modules
    ):
        return modules[value.func.value.id], value.func.attr
    return None


def rows(config: Any, config_path: str, defaults: Any | None = None) -> list[tuple[str, str, str]]:
    """(key, value, meaning) for every leaf key of `config`, in ConfigDict (sorted) order.

    The value reads 'X (default Y)' where `defaults` (usually configs/base.py's config) holds
    another value; the meaning is the deepest definition's comment, then a recipe's own note.
    """
    found = comments(config_path)
    flat_defaults = dict(_leaves(defaults)) if defaults is not None else {}
    out = []
    for key, value in _leaves(config):
        texts = _own_or_section(found, key)
        meaning = texts[0] if texts else ""
        notes = [t for t in texts[1:] if t != meaning]
        if notes:
            meaning += f" [{os.path.basename(config_path)}: {'; '.join(notes)}]"
        shown = repr(value)
        if key in flat_defaults and flat_defaults[key] != value:
            shown += f" (default {flat_defaults[key]!r})"
        out.append((key, shown, meaning))
    return out


def _own_or_section(found: dict[str, list[str]], key: str) -> list[str]:
    while key:
        if found.get(key):
            return found[key]
        key = key.rpartition(".")[0]
    return []


def _leaves(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every non-dict entry of a ConfigDict (an empty section counts)."""
    out = []
    for key in config.keys():
        value = config[key]
        full = f"{prefix}{key}"
        if hasattr(value, "keys"):
            children = _leaves(value, f"{full}.")
            out.extend(children or [(full, {})])  # an empty section (data.validation) is a key
        else:
            out.append((full, value))
    return out


def base_defaults() -> Any | None:
    """configs/base.py's config (every run's defaults), or None where `configs` is not
    importable (jaxlm installed without its repository)."""
    try:
        from configs import base
    except ImportError:
        return None
    return base.get_config()


def listing(config: Any, config_path: str, defaults: Any | None = None) -> str:
    """The text `--list_config` prints: one 'key = value  # meaning' line per key."""
    table = rows(config, config_path, defaults)
    width = max(len(f"{k} = {v}") for k, v, _ in table)
    lines = [f"{f'{k} = {v}':<{width}}  # {m}" if m else f"{k} = {v}" for k, v, m in table]
    return "\n".join(
        [
            f"# every key of {config_path}: value (default, where the recipe changes it)  # "
            "meaning. Override any with --config.<key>=<value>.",
            *lines,
        ]
    )
