"""Downstream zero-shot evaluation: multiple-choice tasks, a built-in task, trained-model loading.

Tasks are JSONL in the lm-evaluation-harness style, one example per line:
`{"context": str, "choices": [str, ...], "gold": int}`.

Scoring: each choice is scored by the log-probability of its tokens given the context,
`log p(choice | BOS + context)`. `accuracy` divides that sum by the choice's length in UTF-8
bytes (the harness's `acc_norm` divides by characters), so long choices are not penalised and
scores stay comparable across tokenizers; the per-token mean and the raw sum are reported too
(`accuracy_per_token`, `accuracy_unnormalized`).
Context and choice are encoded separately, so a choice's tokens never depend on its context.

All (context + choice) sequences of a task are packed into fixed-size rows as separate segments
(attention never crosses a segment), and one jitted function returns each segment's summed
choice log-probability and token count, so a task compiles once and runs in a few batches.

`build_next_line_task` makes a task from a run's own held-out text (which line comes next?), so
even the tiny run trained on Python source gets a capability curve with no download.
`load_trained` restores the parameters of a run's newest (or given) checkpoint from its workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlm import sharding
from jaxlm.errors import JaxlmError

Example = dict[str, Any]  # {"context": str, "choices": [str, ...], "gold": int}


class TextEncoder(Protocol):
    """What scoring needs from a tokenizer."""

    bos_id: int

    def encode(self, text: str) -> list[int]: ...


# --------------------------------------------------------------------------- task files


def load_task(path: str) -> list[Example]:
    """Reads a JSONL multiple-choice task, checking every example.

    Raises JaxlmError naming the file and line of the first malformed example.
    """
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


# --------------------------------------------------------------------------- scoring


def segment_logprobs(
    graphdef: Any, params: Any, batch: dict[str, jax.Array], num_segments: int
) -> tuple[jax.Array, jax.Array]:
    """Summed target log-probability and target count of each packed segment.

    Args:
      batch: inputs, targets, segment_ids (0 = padding, else 1..num_segments), positions
        int32 (B, L); loss_mask float32 (B, L), 1 on the tokens being scored.
      num_segments: S, the most segments any row holds.

    Returns:
      (logprob sums (B, S), token counts (B, S)); column s is segment id s + 1.
    """
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])  # (B, L, V) fp32
    mask = batch["loss_mask"]
    logprob = (
        -optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * mask
    )  # (B, L)
    # Padding has segment id 0 -> index -1 -> an all-zero one-hot row.
    onehot = jax.nn.one_hot(batch["segment_ids"] - 1, num_segments, dtype=jnp.float32)  # (B, L, S)
    return jnp.einsum("BL,BLS->BS", logprob, onehot), jnp.einsum("BL,BLS->BS", mask, onehot)


@functools.lru_cache(maxsize=8)
def _jitted_scorer(mesh: jax.sharding.Mesh | None):
    # Replicated outputs let every host read every score on multi-host meshes.
    out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        segment_logprobs, static_argnames=("graphdef", "num_segments"), out_shardings=out
    )


@dataclasses.dataclass
class _Packed:
    rows: dict[str, np.ndarray]  # the batch fields, (R, L)
    where: np.ndarray  # (N, 2): (row, segment column) of each sequence, in example-choice order
    num_segments: int


def _pack(
    tokenizer: TextEncoder, examples: Sequence[Example], seq_len: int, max_segments: int
) -> _Packed:
    """Encodes every (context, choice) pair and packs them in order into rows of `seq_len`."""
    rows: list[list[tuple[list[int], int]]] = [[]]  # per row: (token sequence, choice length)
    used = 0
    where = []
    # Every training row starts a document with BOS; a tokenizer without one gets no prefix.
    head = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    for e, ex in enumerate(examples):
        context = tokenizer.encode(ex["context"])
        for c, choice in enumerate(ex["choices"]):
            ids = tokenizer.encode(choice)
            if not ids or len(ids) > seq_len:
                raise JaxlmError(
                    f"example {e} choice {c} encodes to {len(ids)} tokens; a choice needs 1 to "
                    f"seq_len={seq_len} tokens (raise seq_len or shorten the choice)."
                )
            # Inputs are BOS + context + choice[:-1]; a context too long for the row loses its
            # oldest tokens (BOS stays).
            budget = seq_len + 1 - len(head) - len(ids)
            seq = [*head, *context[max(0, len(context) - budget) :], *ids]
            if len(seq) == len(ids):
                raise JaxlmError(
                    f"example {e} has an empty context and the tokenizer has no BOS token, so "
                    "its first choice token cannot be scored; give it a context."
                )
            if used + len(seq) - 1 > seq_len or len(rows[-1]) == max_segments:
                rows.append([])
                used = 0
            where.append((len(rows) - 1, len(rows[-1])))
            rows[-1].append((seq, len(ids)))
            used += len(seq) - 1
    fields = {
        k: np.zeros((len(rows), seq_len), np.int32)
        for k in ("inputs", "targets", "segment_ids", "positions")
    }
    fields["loss_mask"] = np.zeros((len(rows), seq_len), np.float32)
    for r, row in enumerate(rows):
        start = 0
        for s, (seq, n_choice) in enumerate(row):
            n = len(seq) - 1
            span = slice(start, start + n)
            fields["inputs"][r, span] = seq[:-1]
            fields["targets"][r, span] = seq[1:]
            fields["segment_ids"][r, span] = s + 1
            fields["positions"][r, span] = np.arange(n)
            fields["loss_mask"][r, start + n - n_choice : start + n] = 1.0
            start += n
    # Rounded up to a power of two so tasks of similar shape share one compiled function.
    num_segments = 1 << (max(len(row) for row in rows) - 1).bit_length()
    return _Packed(fields, np.asarray(where, np.int64), num_segments)


def score_task(
    graphdef: Any,
    params: Any,
    tokenizer: TextEncoder,
    examples: Sequence[Example],
    *,
    seq_len: int,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
    max_segments: int = 32,
) -> dict[str, float]:
    """Zero-shot multiple-choice accuracy of a model on `examples`.

    Args:
      graphdef, params: the model (`Setup.graphdef`, `state['params']`).
      tokenizer: `.encode(str) -> list[int]` and `.bos_id`.
      examples: `{"context", "choices", "gold"}` dicts (see `load_task`).
      seq_len: L, tokens per packed row; a context longer than L minus its choice is cut from
        the left.
      batch_size: rows per call (rounded up to a multiple of the mesh's batch split).
      mesh: when given, rows are split over its batch axes (params keep their own shardings);
        every process must pass the same examples.
      max_segments: most sequences packed into one row.

    Returns:
      accuracy (choice log-prob per UTF-8 byte), accuracy_per_token, accuracy_unnormalized,
      n (examples) and chance (the expected accuracy of a random guess).
    """
    if not examples:
        raise JaxlmError("the task has no examples to score.")
    packed = _pack(tokenizer, examples, seq_len, max_segments)
    n_rows = len(packed.rows["inputs"])
    if mesh is not None:
        split = sharding.batch_divisor(mesh)
        batch_size = -(-batch_size // split) * split
    scorer = _jitted_scorer(mesh)
    sums, counts = [], []
    for lo in range(0, n_rows, batch_size):
        chunk = {k: v[lo : lo + batch_size] for k, v in packed.rows.items()}
        pad = batch_size - len(chunk["inputs"])
        if pad:  # one batch shape, one compilation; padding rows have segment id 0 everywhere
            chunk = {
                k: np.concatenate([v, np.zeros((pad, seq_len), v.dtype)]) for k, v in chunk.items()
            }
        if mesh is None:
            chunk = jax.device_put(chunk)  # explicit, so a transfer guard does not object
        else:
            rows = sharding.batch_sharding(mesh)
            chunk = {k: sharding.place(v, rows) for k, v in chunk.items()}
        s, c = scorer(graphdef, params, chunk, num_segments=packed.num_segments)
        s, c = jax.device_get((s, c))  # explicit, so a transfer guard does not object
        sums.append(s)
        counts.append(c)
    sums_all, counts_all = np.concatenate(sums), np.concatenate(counts)  # (R, S)
    logprob = sums_all[packed.where[:, 0], packed.where[:, 1]]  # (N,) per (example, choice)
    tokens = counts_all[packed.where[:, 0], packed.where[:, 1]]

    hits = {"bytes": 0, "tokens": 0, "raw": 0}
    k = 0
    for ex in examples:
        n = len(ex["choices"])
        lp, nt = logprob[k : k + n], tokens[k : k + n]
        nbytes = np.array([max(len(c.encode("utf-8")), 1) for c in ex["choices"]], np.float64)
        for name, score in (("bytes", lp / nbytes), ("tokens", lp / nt), ("raw", lp)):
            hits[name] += int(np.argmax(score) == ex["gold"])
        k += n
    total = len(examples)
    return {
        "accuracy": hits["bytes"] / total,
        "accuracy_per_token": hits["tokens"] / total,
        "accuracy_unnormalized": hits["raw"] / total,
        "n": total,
        "chance": float(np.mean([1 / len(ex["choices"]) for ex in examples])),
    }


def score_tasks(
    graphdef: Any,
    params: Any,
    tokenizer: TextEncoder,
    tasks: dict[str, Sequence[Example]],
    **kwargs: Any,
) -> dict[str, float]:
    """`score_task` over named tasks, flattened as `{'<task>/accuracy': ..., ...}` for logging."""
    out = {}
    for name in sorted(tasks):
        result = score_task(graphdef, params, tokenizer, tasks[name], **kwargs)
        out.update({f"{name}/{k}": float(v) for k, v in result.items()})
    return out


# --------------------------------------------------------------------------- trained models


@dataclasses.dataclass
class Trained:
    """A run's model restored from its workdir."""

    config: Any  # the run's ConfigDict
    setup: Any  # train.Setup: graphdef, shardings, mesh, rules
    params: Any  # restored parameter pure dict, in setup.param_shardings
    tokenizer: Any  # jaxlm.data.tokenizer.Tokenizer
    step: int  # the checkpoint's step


def load_trained(
    workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None
) -> Trained:
    """Restores the parameters (not the optimizer state) of a run's newest or given checkpoint.

    The config comes from the checkpoint's metadata (falling back to `<workdir>/config.json`), the
    tokenizer from `<workdir>/tokenizer.model` (falling back to the config's `tokenizer.path`),
    checked against the hash recorded in the checkpoint.

    Args:
      workdir: the run directory given to `jaxlm.main --workdir`.
      step: checkpoint step to load; None = the newest.
      mesh: where to place the params; default all devices, (1, -1, 1) with the run's preset.
    """
    import ml_collections
    from flax import traverse_util

    from jaxlm import checkpoint as ckpt_lib
    from jaxlm import train
    from jaxlm.data import tokenizer as tokenizer_lib

    if not os.path.isdir(workdir):
        raise JaxlmError(
            f"workdir {workdir!r} does not exist; pass the --workdir of a training run."
        )
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = ckpt_lib.all_steps(ckpt_dir)
    if not steps:
        raise JaxlmError(
            f"no checkpoint in {ckpt_dir}; train first (python -m jaxlm.main --workdir={workdir})."
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise JaxlmError(f"no checkpoint at step {step} in {ckpt_dir}; available steps: {steps}.")

    meta = ckpt_lib.read_step_meta(ckpt_dir, step)
    config_dict = meta.get("config")
    if config_dict is None and meta.get("model_config"):  # `convert_hf.py import`'s workdir
        config_dict = _imported_config(meta["model_config"])
    if config_dict is None:
        config_path = os.path.join(workdir, "config.json")
        if not os.path.isfile(config_path):
            raise JaxlmError(f"checkpoint {step} records no config and {config_path} is missing.")
        with open(config_path) as f:
            config_dict = json.load(f)
    config = ml_collections.ConfigDict(config_dict)

    tokenizer = tokenizer_lib.load(_find_tokenizer(workdir, config))
    expected = meta.get("tokenizer_sha256")
    if expected and tokenizer.sha256 != expected:
        raise JaxlmError(
            f"{tokenizer.path} (sha256 {tokenizer.sha256[:12]}) is not the tokenizer checkpoint "
            f"{step} was trained with ({expected[:12]}); copy the run's tokenizer.model into "
            f"{workdir}."
        )
    if mesh is None:
        mesh = sharding.make_mesh((1, -1, 1))
    # The checkpoint's embedding fixes the vocab (it may be padded beyond the tokenizer's).
    vocab_size = (meta.get("param_shapes") or {}).get("embed", [tokenizer.vocab_size])[0]
    setup = train.Setup(config, vocab_size, mesh)
    ckpt_lib.check_compatible(meta, setup.abstract_state)
    abstract = traverse_util.flatten_dict(setup.abstract_state["params"])
    shardings = {path: leaf.sharding for path, leaf in abstract.items()}
    params = traverse_util.unflatten_dict(
        ckpt_lib.restore_params(ckpt_dir, step, abstract, shardings)
    )
    return Trained(config=config, setup=setup, params=params, tokenizer=tokenizer, step=step)


def _imported_config(model_config: dict) -> dict:
    """The run config `load_trained` needs for imported weights, which come with a model config
    only: that model, on one mesh, with an optimizer that is built but never stepped."""
    optim = dict(lr=0.0, init_lr=0.0, min_lr_ratio=0.0, warmup_steps=0, schedule="constant")
    optim.update(decay_fraction=0.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=0.0)
    return {
        "seed": 0,
        "model": model_config,
        "mesh": {"preset": "fsdp", "shape": (1, -1, 1)},
        "optim": optim,
        "train": {"steps": 1, "grad_accum": 1, "spike_ratio": 0.0, "spike_warmup": 0},
    }


def _find_tokenizer(workdir: str, config: Any) -> str:
    # The workdir's copy first (an import workdir keeps it in tokenizer/); then where the
    # run's config says the tokenizer came from.
    candidates = [
        os.path.join(workdir, *name)
        for name in (
            ("tokenizer.model",),
            ("tokenizer.json",),
            ("tokenizer", "tokenizer.json"),
            ("tokenizer", "tokenizer.model"),
        )
    ]
    if config.get("tokenizer") and config.tokenizer.get("path"):
        candidates.append(config.tokenizer.path)
    if config.get("data") and config.data.get("manifest"):
        from jaxlm.data import manifest as manifest_lib

        with contextlib.suppress(JaxlmError):  # a moved or stale manifest offers no candidate
            candidates.append(manifest_lib.tokenizer_path(manifest_lib.load(config.data.manifest)))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise JaxlmError(
        f"no tokenizer for the run in {workdir}: looked for {', '.join(candidates)}; copy the "
        "run's tokenizer.model (from its prepared-data folder) into the workdir."
    )
