"""Hugging Face tokenizers: a ``tokenizer.json`` backend and tokenizer files for transformers.

:class:`HFTokenizer` has the interface of :class:`jaxlm.data.tokenizer.Tokenizer`;
:func:`load_any` picks the backend by content; :func:`write_for_transformers` writes the files
``transformers.AutoTokenizer`` loads next to exported weights.

Models imported from Hugging Face must be trained on text tokenized exactly as in their
pretraining; this wraps the ``tokenizers`` library (``pip install 'jaxlm[hf]'``) so data
preparation can use the model's own ``tokenizer.json``.

Special ids come from the ``tokenizer.json`` bytes alone, never from sibling files: data
preparation copies the tokenizer file into its cache, and the same file must always give the
same BOS/EOS (the manifest and checkpoints identify a tokenizer by the file's sha256). BOS is the
special token the post-processor puts first (``<s>`` in Llama 2, ``<|begin_of_text|>`` in
Llama 3), EOS the first of the usual end-of-text names present; a tokenizer with no end-of-text
token is refused, since every record ends with EOS.

``encode`` never adds special tokens: the training pipeline adds BOS itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

from jaxlm.data.records import file_sha256
from jaxlm.data.tokenizer import tokenizer_info
from jaxlm.errors import JaxlmError

BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>", "<|eot_id|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
UNK_NAMES = ("<unk>", "[UNK]")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


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
    """

    def __init__(self, data: bytes, path: str = "") -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise JaxlmError(
                f"{path or 'tokenizer.json'} needs the 'tokenizers' package; "
                "run pip install 'jaxlm[hf]'."
            ) from None
        text = data.decode("utf-8")
        try:
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
        """Loads a ``tokenizer.json`` file."""
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

    def info(self) -> dict[str, Any]:
        """The manifest's ``tokenizer`` entry (without the file name)."""
        return tokenizer_info(self)

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
        )


# --------------------------------------------------------------------------- tokenizer files


def load_any(path: str) -> Any:
    """A ``tokenizer.json`` as :class:`HFTokenizer`, anything else as a sentencepiece model."""
    if is_tokenizer_json(path):
        return HFTokenizer.load(path)
    from jaxlm.data.tokenizer import Tokenizer

    return Tokenizer.load(path)


def find_tokenizer(directory: str) -> str:
    """The tokenizer file of a model directory: tokenizer.json, else tokenizer.model ('' if none).

    tokenizer.json first: it is what ``transformers.AutoTokenizer`` uses, and some families
    (Llama 3) ship a tokenizer.model that is not sentencepiece.
    """
    for name in ("tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return ""


def copy_files(src_dir: str, dst_dir: str) -> str:
    """Copies a model directory's tokenizer files; returns the sha256 of the one jaxlm reads."""
    present = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
    if not present:
        return ""
    os.makedirs(dst_dir, exist_ok=True)
    for name in present:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    return file_sha256(find_tokenizer(dst_dir)) if find_tokenizer(dst_dir) else ""


def write_for_transformers(source: str, out_dir: str, model_max_length: int) -> dict[str, Any]:
    """Writes tokenizer files ``transformers.AutoTokenizer`` loads; returns config.json's ids.

    ``source`` is a directory of Hugging Face tokenizer files or one file of such a directory
    (the files are copied as they are), a lone ``tokenizer.json`` (written as
    PreTrainedTokenizerFast), or a lone sentencepiece ``.model`` (written as LlamaTokenizer,
    which transformers converts: that matches sentencepiece on prose, not on the whitespace
    pieces of jaxlm's code-safe models).
    """
    parent = os.path.dirname(os.path.abspath(source))
    if os.path.basename(source) in ("tokenizer.json", "tokenizer.model") and os.path.isfile(
        os.path.join(parent, "tokenizer_config.json")
    ):
        source = parent  # a model directory's file: keep its own config (special tokens, class)
    file = find_tokenizer(source) if os.path.isdir(source) else source
    tok, is_json = load_any(file), is_tokenizer_json(file)
    special = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id if tok.pad_id >= 0 else None,
    }
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isdir(source):
        copy_files(source, out_dir)
        if os.path.isfile(os.path.join(source, "tokenizer_config.json")):
            return special
    else:
        name = "tokenizer.json" if is_json else "tokenizer.model"
        shutil.copyfile(file, os.path.join(out_dir, name))

    def piece(i: int) -> str | None:
        return tok.id_to_piece(i) if i is not None and i >= 0 else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast" if is_json else "LlamaTokenizer",
        "bos_token": piece(tok.bos_id),
        "eos_token": piece(tok.eos_id),
        "pad_token": piece(tok.pad_id),
        "unk_token": piece(getattr(tok, "unk_id", -1)),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    if not is_json:  # tell the converter whether this model adds a dummy-prefix space
        first = [tok.id_to_piece(i) for i in tok.encode("a")[:1]]
        config.update(
            add_bos_token=True,
            add_eos_token=False,
            legacy=False,
            add_prefix_space=bool(first) and first[0].startswith("\u2581"),
        )
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f, indent=2)
    return special
