"""Loss, perplexity and bits per byte of text files, over documented windows.

Documents: the files of each `--data` entry (a path, glob or directory) are read by
`jaxlm.data.sources` — a text file (.txt, .md, .py, ...) is one document, a JSONL or Parquet
file one document per record (`text_field`). Documents are scored independently.

Windows: a document of n tokens x_1..x_n is scored as t = [BOS] + x (no BOS if the tokenizer
has none: then x_1 is context only). Every x_i is scored exactly once, given the tokens before
it inside its window of at most L inputs (L = the model's length):

- stride L (the default): windows end at t-positions e = L, 2L, ..., n, each reading the L
  inputs t[e-L:e] and scoring the targets after the previous window's end. The windows are
  disjoint except the last, which reaches back to a full L inputs; this is exactly the
  lm-evaluation-harness's `loglikelihood_rolling`.
- stride S < L (sliding): windows end at e = L, L+S, L+2S, ..., n; each scores only its last S
  (new) targets, so every token after the first L sees at least L - S tokens of context. Costs
  about L / S times more compute.

The end-of-text token is not scored. loss is nats per scored token, perplexity exp(loss), and
bits per byte the summed loss / ln 2 / the documents' UTF-8 bytes (tokenizer-independent).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from jaxlm.errors import JaxlmError
from jaxlm.evaluate import scoring


def windows(n_tokens: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(first input, end, targets scored) of each window over t = [BOS] + x, len(x) = n_tokens.

    A window reads inputs t[first:end] and predicts t[first+1:end+1], scoring the last
    `targets scored` of them (see the module docstring).
    """
    if not 1 <= stride <= seq_len:
        raise JaxlmError(f"--stride={stride} must be between 1 and the window length {seq_len}.")
    previous, end = 0, min(seq_len, n_tokens)
    while previous < n_tokens:
        yield max(0, end - seq_len), end, end - previous
        previous, end = end, min(end + stride, n_tokens)


def document_windows(ids: Sequence[int], bos_id: int, seq_len: int, stride: int) -> list:
    """The scored sequences (`scoring.Scored`) of one document's windows."""
    t = [bos_id, *ids] if bos_id >= 0 else list(ids)
    n = len(t) - 1  # targets
    return [(t[first : end + 1], scored) for first, end, scored in windows(n, seq_len, stride)]


@dataclasses.dataclass
class Corpus:
    """One `--data` entry, tokenized."""

    name: str
    documents: list[list[int]]
    bytes: int


def check_data(paths: str, text_field: str = "text") -> None:
    """Raises a one-sentence JaxlmError if `paths` matches no file or holds no text (it reads
    up to the first document: cheap, so it runs before a model is loaded)."""
    from jaxlm.data import sources

    if not any(doc["text"].strip() for doc in sources.Source(paths, text_field=text_field)):
        raise JaxlmError(
            f"{paths} holds no text to evaluate (empty files, or no '{text_field}' field in its "
            "records); pass a file with text in it."
        )


def read_corpus(paths: str, tokenizer: Any, text_field: str = "text") -> Corpus:
    """The documents of one path/glob/directory (see `check_data`), tokenized."""
    from jaxlm.data import sources

    documents, nbytes = [], 0
    for doc in sources.Source(paths, text_field=text_field):
        ids = tokenizer.encode(doc["text"])
        if ids:
            documents.append(ids)
            nbytes += len(doc["text"].encode("utf-8"))
    if not documents:
        check_data(paths, text_field)  # the reason, in one sentence
        raise JaxlmError(f"{paths} encodes to no tokens; pass a file with text in it.")
    return Corpus(paths, documents, nbytes)


def evaluate_corpus(
    trained: Any,
    corpus: Corpus,
    *,
    seq_len: int,
    stride: int,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Loss, perplexity and bits per byte of a tokenized corpus under `trained`'s model.

    Args:
      trained: an `evaluate.trained.Trained` (a run, an import or a Hugging Face model).
      corpus: from `read_corpus`.
      seq_len, stride: the windows (module docstring).
      batch_size: rows of seq_len tokens per call.
      progress: called as `progress(rows done, rows in all)`.
    """
    bos = trained.tokenizer.bos_id
    seqs = [seq for ids in corpus.documents for seq in document_windows(ids, bos, seq_len, stride)]
    setup = trained.setup
    scores = scoring.score_sequences(
        setup.graphdef,
        trained.params,
        seqs,
        seq_len=seq_len,
        batch_size=batch_size,
        mesh_rules=setup.mesh_rules,
        progress=progress,
    )
    nll, tokens = -float(scores.logprob.sum()), int(scores.tokens.sum())
    return summary(nll, tokens, corpus.bytes, len(corpus.documents))


def summary(nll: float, tokens: int, nbytes: int, documents: int) -> dict[str, float]:
    """The reported numbers of summed loss `nll` over `tokens` tokens of `nbytes` bytes."""
    loss = nll / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "bits_per_byte": nll / math.log(2) / max(nbytes, 1),
        "tokens": tokens,
        "bytes": nbytes,
        "documents": documents,
        "nll": nll,
    }
