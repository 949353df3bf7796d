"""Tokenizers: two backends with one interface, the one loader, a code-safe trainer, a sampler.

:class:`Tokenizer` (sentencepiece) and :class:`HFTokenizer` (a Hugging Face ``tokenizer.json``)
are deliberately thin (encode, decode, special ids, file hash) and interchangeable.
:func:`load` is the only way jaxlm opens a tokenizer file: it picks the backend from the file's
content, so a ``tokenizer.json`` copied under another name (data preparation stores it as given)
still loads as what it is, and a broken file is one error sentence naming that file.

Special ids are fixed for every model trained here: ``pad=0, unk=1, bos=2, eos=3``. Pad 0 lets
padded batches be made with ``np.zeros``.

Code safety: sentencepiece's defaults (NFKC normalisation, collapsing runs of spaces, a dummy
prefix space) would make ``decode(encode(x)) != x`` on source code. With ``code_safe`` the model
uses identity normalisation, keeps every space, adds no prefix, falls back to bytes for unseen
characters, and has single pieces for newline, tab and 4/8-space indents.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sentencepiece as spm

from jaxlm.errors import JaxlmError, TokenizerMismatch

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Newlines and tabs always get pieces of their own. Runs of spaces are left to BPE (with
# whitespace-only pieces allowed): sentencepiece maps spaces to "▁" before matching, so a literal
# "    " user piece would never fire, and HF's converter would match it, breaking export parity.
CODE_PIECES = ["\n", "\t"]
_CHUNK_CHARS = 4000  # sentencepiece skips "sentences" longer than max_sentence_length bytes
_MAX_SENTENCE_BYTES = 4 * _CHUNK_CHARS  # a char is at most 4 UTF-8 bytes


class Tokenizer:
    """A sentencepiece model.

    Attributes:
      path: the ``.model`` file it was loaded from ('' if built from bytes).
      sha256: hex digest of the model file's bytes; manifests and checkpoints record it so data
        tokenized with one model is never trained on with another.
    """

    def __init__(self, model_proto: bytes, path: str = "") -> None:
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError:  # sentencepiece's message is a C++ source location, not a reason
            self._sp = None
        if self._sp is None or self._sp.get_piece_size() == 0:  # empty bytes parse as no model
            raise JaxlmError(
                f"{path or 'the tokenizer'} is not a sentencepiece model (it does not parse); "
                "point tokenizer.path at a valid .model or tokenizer.json file."
            )
        self.path = path
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()
        # Whether a prompt starts with BOS, as LlamaTokenizer (add_bos_token) does.
        self.add_bos: bool = self.bos_id >= 0

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Loads a sentencepiece ``.model`` (callers use :func:`load`: it picks the backend)."""
        with open(path, "rb") as f:
            return cls(f.read(), os.path.abspath(path))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of several texts in one call; ``num_threads=-1`` uses every CPU."""
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special ids decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a piece, or None if the vocabulary lacks it."""
        i = self._sp.piece_to_id(piece)
        return None if i == self.unk_id and piece != self.id_to_piece(i) else int(i)

    def info(self) -> dict[str, Any]:
        """The manifest's ``tokenizer`` entry (without the file name)."""
        return tokenizer_info(self)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def prompt_ids(tok: Any, text: str) -> list[int]:
    """The ids of a prompt as the tokenizer's own library gives them: BOS first only where it
    adds one (`add_bos`), so jaxlm continues a prompt from the same tokens transformers sees."""
    return ([tok.bos_id] if tok.add_bos else []) + tok.encode(text)


def tokenizer_info(tok: Any) -> dict[str, Any]:
    """The manifest's ``tokenizer`` entry for any backend with the Tokenizer interface."""
    return {
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
    }


def is_tokenizer_json(path: str) -> bool:
    """True for a Hugging Face ``tokenizer.json`` (by suffix, or JSON content under another name).

    Data preparation may store the file under a fixed name; a sentencepiece model is a binary
    protobuf and never starts with '{'.
    """
    if path.endswith(".json"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(64).lstrip()[:1] == b"{"
    except OSError:
        return False


def load(path: str) -> Tokenizer | HFTokenizer:
    """Loads a tokenizer file: the one loader every jaxlm module and tool calls.

    A ``tokenizer.json`` (by suffix or content, see :func:`is_tokenizer_json`) loads as
    :class:`HFTokenizer`; anything else as a sentencepiece :class:`Tokenizer`.

    Raises:
      JaxlmError: the file is missing or not a valid tokenizer (one sentence naming ``path``).
    """
    if not os.path.isfile(path):
        raise JaxlmError(f"tokenizer file {path} does not exist.")
    if is_tokenizer_json(path):
        return HFTokenizer.load(path)
    return Tokenizer.load(path)


def _chunks(texts: Iterable[str], cap_bytes: int) -> Iterator[str]:
    """Cuts documents into line-aligned pieces sentencepiece accepts, up to ``cap_bytes``."""
    total = 0
    for text in texts:
        i = 0
        while i < len(text):
            j = min(len(text), i + _CHUNK_CHARS)
            if j < len(text):
                k = text.rfind("\n", i, j)
                j = k + 1 if k > i else j  # keep the newline with its line
            piece = text[i:j]
            total += len(piece.encode("utf-8", "surrogatepass"))
            yield piece
            if total >= cap_bytes:
                return
            i = j


def trainer_options(tok_cfg: Any) -> dict[str, Any]:
    """sentencepiece trainer keyword arguments for a tokenizer config."""
    model_type = tok_cfg.model_type
    if model_type not in ("bpe", "unigram", "char"):
        raise ValueError(f"tokenizer.model_type={model_type!r} is not one of bpe, unigram, char.")
    opts: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=int(tok_cfg.vocab_size),
        byte_fallback=bool(tok_cfg.byte_fallback),
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        character_coverage=0.9995 if tok_cfg.byte_fallback else 1.0,
        num_threads=max(1, min(16, os.cpu_count() or 1)),
        minloglevel=2,  # sentencepiece logs thousands of lines at INFO
        # A small corpus may not support the requested vocabulary; shrink rather than fail.
        hard_vocab_limit=model_type != "bpe",
        use_all_vocab=model_type == "char",
    )
    if tok_cfg.code_safe:
        opts.update(
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=CODE_PIECES,
        )
    # An objective's pieces ([MASK], FIM sentinels: objectives.tokenizer_config) are whole
    # symbols that text never splits; the key exists only when there are some.
    special = list(tok_cfg.get("special_pieces", ()))
    if special:
        opts["user_defined_symbols"] = list(opts.get("user_defined_symbols", [])) + special
    n_bytes = 256 if opts["byte_fallback"] else 0
    n_user = len(opts.get("user_defined_symbols", []))
    if opts["vocab_size"] <= 4 + n_bytes + n_user:
        # Caught here, before any data work, rather than by sentencepiece after curation.
        raise ValueError(
            f"tokenizer.vocab_size={opts['vocab_size']} is too small: {4 + n_bytes + n_user} "
            f"pieces are reserved (4 special ids, {n_bytes} byte-fallback bytes, {n_user} "
            "user-defined) before one piece per character of the corpus; use a few hundred more."
        )
    return opts


def train_tokenizer(texts: Iterable[str], tok_cfg: Any, out_path: str) -> Tokenizer:
    """Trains a sentencepiece model on at most ``tok_cfg.sample_bytes`` of ``texts``.

    Args:
      texts: documents; pass a deterministic sample (see :class:`HashSampler`). Only the first
        ``sample_bytes`` are read, so an unbounded iterable is safe.
      tok_cfg: ``model_type``, ``vocab_size``, ``sample_bytes``, ``byte_fallback``, ``code_safe``.
      out_path: where to write the ``.model`` file (written atomically).

    Returns:
      The trained tokenizer, loaded from ``out_path``.
    """
    buf = io.BytesIO()
    opts = trainer_options(tok_cfg)
    sentences = _chunks(texts, int(tok_cfg.sample_bytes))
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=buf, **opts)
    except RuntimeError as e:
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if needed:
            raise ValueError(
                f"tokenizer.vocab_size={tok_cfg.vocab_size} is too small for this corpus: its "
                f"characters and the reserved pieces need at least {needed.group(1)}; raise it."
            ) from None
        raise ValueError(
            f"Training the tokenizer failed ({e}); the sample may be too small for "
            f"vocab_size={tok_cfg.vocab_size}."
        ) from e
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, out_path)
    return Tokenizer.load(out_path)


class HashSampler:
    """A deterministic, order-independent sample of documents, at most ``cap_bytes`` in size.

    Keeps the documents with the smallest priority (a hash of their content): the same corpus
    always gives the same sample however it is ordered or split, memory stays bounded by the
    cap, and every document has the same chance regardless of its position in the stream.
    """

    def __init__(self, cap_bytes: int) -> None:
        self.cap = int(cap_bytes)
        self.bytes = 0
        self.frontier = float("inf")  # lowest priority ever evicted; nothing at/above it enters
        self._heap: list[tuple[int, int, str]] = []  # (-priority, nbytes, text): max-heap

    def add(self, text: str, priority: int) -> None:
        """Offers one document; ``priority`` must be a content hash (same text, same value)."""
        if priority >= self.frontier:
            return
        data = text.encode("utf-8", "surrogatepass")
        if len(data) > self.cap:  # one huge document must not be more than the whole sample
            data = data[: self.cap]
            text = data.decode("utf-8", "ignore")
        heapq.heappush(self._heap, (-priority, len(data), text))
        self.bytes += len(data)
        # Evicting from the top keeps the sample equal to the longest prefix (by priority) of
        # *all* documents that fits the cap, whatever order they arrive in.
        while self.bytes > self.cap:
            neg, n, _ = heapq.heappop(self._heap)
            self.bytes -= n
            self.frontier = -neg

    def merge(self, other: HashSampler) -> None:
        """Adds another part's sample: the sample of the union, as if one sampler saw it all
        (a document in the union's sample is in its own part's sample, which keeps more)."""
        for neg, _, text in other._heap:
            self.add(text, -neg)
        self.frontier = min(self.frontier, other.frontier)
        while self._heap and -self._heap[0][0] >= self.frontier:
            _, n, _ = heapq.heappop(self._heap)
            self.bytes -= n

    def texts(self) -> list[str]:
        """The sample, in priority order (so training sees the same sequence every time)."""
        return [t for _, _, t in sorted(self._heap, key=lambda x: -x[0])]


# --------------------------------------------------------------------------- Hugging Face backend
# Models imported from Hugging Face must be trained on text tokenized exactly as in their
# pretraining, so data preparation can use the model's own tokenizer.json through the
# `tokenizers` library (pip install 'jaxlm[hf]'; imported only when such a file is loaded).
#
# Special ids come from the tokenizer.json bytes alone, never from sibling files: data
# preparation copies the tokenizer file into its cache, and the same file must always give the
# same BOS/EOS (manifests and checkpoints identify a tokenizer by the file's sha256). BOS is the
# special token the post-processor puts first (<s> in Llama 2, <|begin_of_text|> in Llama 3),
# EOS the first of the usual end-of-text names present; a tokenizer with no end-of-text token
# is refused, since every record ends with EOS. `encode` never adds special tokens: the
# training pipeline adds BOS itself.

BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>", "<|eot_id|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
UNK_NAMES = ("<unk>", "[UNK]")


def _post_processor_bos(spec: dict | None) -> str | None:
    """The special token a TemplateProcessing post-processor puts before a single sequence."""
    if not spec:
        return None
    if spec.get("type") == "Sequence":
        for sub in spec.get("processors", []):
            found = _post_processor_bos(sub)
            if found:
                return found
        return None
    if spec.get("type") == "TemplateProcessing":
        single = spec.get("single") or []
        if single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"]["id"]
    return None


class HFTokenizer:
    """A ``tokenizers`` tokenizer loaded from a ``tokenizer.json`` file.

    Attributes:
      path: the file it was loaded from ('' if built from bytes).
      sha256: hex digest of the file's bytes (as recorded in manifests and checkpoints).
      vocab_size: ids in use, added tokens included.
      bos_id, eos_id, pad_id, unk_id: special ids; -1 where the tokenizer has none.
      add_bos: whether a prompt starts with BOS (the post-processor puts one first).
    """

    def __init__(self, data: bytes, path: str = "") -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise JaxlmError(
                f"{path or 'tokenizer.json'} needs the 'tokenizers' package; "
                "run pip install 'jaxlm[hf]'."
            ) from None
        try:
            text = data.decode("utf-8")
            self._tok = _Tokenizer.from_str(text)
            spec = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise JaxlmError(
                f"{path or 'tokenizer.json'} is not a valid Hugging Face tokenizer.json ({reason})."
            ) from None
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        bos_name = _post_processor_bos(spec.get("post_processor"))
        self.eos_id: int = self._first_id(EOS_NAMES)
        if self.eos_id < 0:
            raise JaxlmError(
                f"{path or 'tokenizer.json'} has none of the end-of-text tokens {list(EOS_NAMES)}; "
                "jaxlm ends every document with one, so this tokenizer cannot prepare data."
            )
        bos = self._tok.token_to_id(bos_name) if bos_name else None
        # transformers' fast tokenizer puts BOS before a prompt only where the post-processor
        # says so (Llama 2/3 do; GPT-2 style tokenizers such as SmolLM's do not).
        self.add_bos: bool = bos is not None
        self.bos_id: int = bos if bos is not None else self._first_id(BOS_NAMES)
        if self.bos_id < 0:
            self.bos_id = self.eos_id  # GPT-2 style: one token separates documents both ways
        self.pad_id: int = self._first_id(PAD_NAMES)
        self.unk_id: int = self._first_id(UNK_NAMES)

    def _first_id(self, names: Sequence[str]) -> int:
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        return -1

    @classmethod
    def load(cls, path: str) -> HFTokenizer:
        """Loads a ``tokenizer.json`` file (callers use :func:`load`: it picks the backend)."""
        with open(path, "rb") as f:
            return cls(f.read(), os.path.abspath(path))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts in one call (the library parallelises it)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens decode to nothing."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a token, or None if the vocabulary lacks it."""
        return self._tok.token_to_id(piece)

    def info(self) -> dict[str, Any]:
        """The manifest's ``tokenizer`` entry (without the file name)."""
        return tokenizer_info(self)

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
        )


def check_same(
    have: str, want: str | Iterable[str] | None, what: str, made_with: str, fix: str
) -> None:
    """Refuses a tokenizer other than the one the data or checkpoint at hand was made with.

    A tokenizer is named by its file's sha256 (manifests and checkpoints record it). Every place
    where a tokenizer, prepared data and a checkpoint meet checks through here: one exception,
    one sentence.

    Args:
      have: the sha256 of the tokenizer at hand.
      want: the sha256 recorded by what it must match (or several, any of which will do); empty
        or None when nothing was recorded, and then there is nothing to compare.
      what: what `have` belongs to, e.g. a file or "the run's data".
      made_with: what `want` belongs to, read after "the tokenizer", e.g. "checkpoint 5 was
        trained with".
      fix: what to do instead.

    Raises:
      TokenizerMismatch: `have` is none of `want`.
    """
    wants = {want} if isinstance(want, str) else set(want or ())
    wants -= {"", None}
    if not wants or have in wants:
        return
    recorded = " or ".join(sorted(w[:12] for w in wants))
    raise TokenizerMismatch(
        f"{what} (tokenizer {have[:12]}) does not match the tokenizer {made_with} ({recorded}); "
        f"{fix}."
    )
