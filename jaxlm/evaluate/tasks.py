"""Multiple-choice task files and the built-in next-line task.

Tasks are JSONL in the lm-evaluation-harness style, one example per line:
`{"context": str, "choices": [str, ...], "gold": int}`; `jaxlm.evaluate.choices` scores them.

`build_next_line_task` makes a task from a run's own held-out text (which line comes next?), so
even the tiny run trained on Python source gets a capability curve with no download.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np

from jaxlm.errors import JaxlmError

Example = dict[str, Any]  # {"context": str, "choices": [str, ...], "gold": int}


# --------------------------------------------------------------------------- task files


def load_task(path: str) -> list[Example]:
    """Reads a JSONL multiple-choice task, checking every example.

    Raises JaxlmError naming the file and line of the first malformed example.
    """
    if os.path.isdir(path):
        raise JaxlmError(
            f"task file {path!r} is a directory; name the .jsonl task files in it, comma-separated."
        )
    if not os.path.isfile(path):
        raise JaxlmError(f"task file {path!r} does not exist; build it or pass another path.")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise JaxlmError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from None
            problem = _example_problem(example)
            if problem:
                raise JaxlmError(f"{path}:{lineno}: {problem}")
            examples.append(example)
    if not examples:
        raise JaxlmError(f"task file {path!r} holds no examples.")
    return examples


def _example_problem(ex: Any) -> str | None:
    if not isinstance(ex, dict):
        return "each line must be a JSON object with context, choices and gold."
    if not isinstance(ex.get("context"), str):
        return "'context' must be a string."
    choices = ex.get("choices")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) for c in choices)
    ):
        return "'choices' must be a list of at least two strings."
    gold = ex.get("gold")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        return f"'gold' must be an integer index into the {len(choices)} choices, not {gold!r}."
    return None


def write_task(path: str, examples: Iterable[Example]) -> None:
    """Writes examples as JSONL, atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- built-in task


def build_next_line_task(
    texts: Iterable[str],
    n_examples: int,
    seed: int = 0,
    context_lines: int = 4,
    n_choices: int = 4,
    *,
    min_chars: int = 8,
    max_chars: int = 120,
) -> list[Example]:
    """Examples of "which line comes next?" drawn deterministically from held-out text.

    Each example's context is `context_lines` consecutive lines of one text (each ending in a
    newline); its choices are the real next line and `n_choices - 1` distractor lines drawn from
    elsewhere in the texts, re-indented to the real line's indentation so indentation alone does
    not give the answer away; `gold` is the real line's (shuffled) position.

    Degenerate lines are never used as answers or distractors: blank or short ones (fewer than
    `min_chars` non-blank characters), long ones (over `max_chars`), distractors whose stripped
    text equals the gold line or any context line, and repeated distractors.

    Args:
      texts: held-out documents, in a fixed order (the result depends on it).
      n_examples: examples wanted; fewer come back if the texts hold fewer usable lines.
      seed: the only source of randomness.
      context_lines, n_choices: lines of context; choices per example (>= 2).

    Returns:
      A list of `{"context", "choices", "gold"}` dicts.
    """
    if n_choices < 2 or context_lines < 1 or n_examples < 1:
        raise JaxlmError(
            f"next-line task needs n_choices >= 2, context_lines >= 1 and n_examples >= 1 "
            f"(got {n_choices}, {context_lines}, {n_examples})."
        )
    files = [text.split("\n") for text in texts]
    usable = lambda line: min_chars <= len(line.strip()) and len(line) <= max_chars  # noqa: E731
    pool = list(dict.fromkeys(line.strip() for lines in files for line in lines if usable(line)))
    if len(pool) < n_choices + context_lines:
        raise JaxlmError(
            f"the held-out text has only {len(pool)} distinct usable lines; the next-line task "
            f"needs at least {n_choices + context_lines} (give it more held-out text)."
        )
    answers = [
        (f, i)
        for f, lines in enumerate(files)
        for i in range(context_lines, len(lines))
        if usable(lines[i]) and any(line.strip() for line in lines[i - context_lines : i])
    ]
    rng = random.Random(seed)
    examples = []
    for f, i in rng.sample(answers, min(n_examples, len(answers))):
        lines = files[f]
        gold_line = lines[i]
        indent = gold_line[: len(gold_line) - len(gold_line.lstrip())]
        taken = {gold_line.strip()} | {line.strip() for line in lines[i - context_lines : i]}
        distractors = []
        while len(distractors) < n_choices - 1:
            candidate = pool[rng.randrange(len(pool))]
            if candidate not in taken:  # the pool check above guarantees enough candidates
                taken.add(candidate)
                distractors.append(indent + candidate)
        gold = rng.randrange(n_choices)
        choices = distractors[:gold] + [gold_line] + distractors[gold:]
        context = "\n".join(lines[i - context_lines : i]) + "\n"
        examples.append({"context": context, "choices": choices, "gold": gold})
    return examples


def heldout_texts(manifest: dict, decode: Any, max_documents: int = 0) -> Iterator[str]:
    """Yields the held-out (val) documents of a prepared corpus as text, in a fixed order.

    Args:
      manifest: from `jaxlm.data.manifest.load`.
      decode: token ids -> text (the run's `tokenizer.decode`).
      max_documents: stop after this many documents; 0 = all.
    """
    import grain

    from jaxlm.data import manifest as manifest_lib

    count = 0
    for name in sorted(manifest["datasets"]):
        paths = manifest_lib.shard_paths(manifest, name, "val")
        if not paths:
            continue
        source = grain.sources.ArrayRecordDataSource(paths)
        for k in range(len(source)):
            ids = np.frombuffer(source[k], dtype="<i4")[:-1]  # the record ends in EOS
            yield decode(ids.tolist())
            count += 1
            if max_documents and count >= max_documents:
                return


def ensure_next_line_task(
    path: str, texts: Iterable[str] | None = None, **build_kwargs: Any
) -> list[Example]:
    """Loads the task at `path`, building it from `texts` and writing it there the first time.

    Keeping the file means every evaluation of a run (and a resumed run) scores the same examples.
    """
    if os.path.isfile(path):
        return load_task(path)
    if texts is None:
        raise JaxlmError(
            f"task file {path!r} does not exist and no held-out text was given to build it."
        )
    examples = build_next_line_task(texts, **build_kwargs)
    if jax.process_index() == 0:
        write_task(path, examples)
    return examples


def run_tasks(config: Any, workdir: str, manifest: dict, tokenizer: Any) -> dict[str, list]:
    """A run's multiple-choice tasks: the built-in next-line task (built from the held-out text
    once, kept in `<workdir>/tasks/`) plus any `eval.task_files`."""
    tasks = {}
    if config.eval.next_line_examples > 0:
        texts = heldout_texts(manifest, tokenizer.decode)
        kwargs = dict(n_examples=config.eval.next_line_examples, seed=config.seed)
        if jax.process_index() == 0:  # one writer; the task is deterministic, others rebuild it
            path = os.path.join(workdir, "tasks", "next_line.jsonl")
            tasks["next_line"] = ensure_next_line_task(path, texts, **kwargs)
        else:
            tasks["next_line"] = build_next_line_task(texts, **kwargs)
    for path in filter(None, (p.strip() for p in config.eval.task_files.split(","))):
        tasks[os.path.splitext(os.path.basename(path))[0]] = load_task(path)
    return tasks
