"""Hugging Face tokenizer files: find and copy them in model folders, write them for transformers.

:func:`write_for_transformers` writes the files ``transformers.AutoTokenizer`` loads next to
exported weights; :func:`find_tokenizer` and :func:`copy_files` handle the tokenizer files of a
Hugging Face model directory. The ``tokenizer.json`` backend itself, :class:`HFTokenizer`, lives
in ``jaxlm.data.tokenizer`` beside the sentencepiece one and the one loader, ``tokenizer.load``;
this module imports that one and is never imported by it.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from jaxlm.data.files import file_sha256
from jaxlm.data.tokenizer import is_tokenizer_json, load

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",  # special tokens, add_bos_token, chat template (transformers 4)
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",  # the chat template as transformers 5 saves it
    "generation_config.json",  # the model's bos/eos/pad ids as generate() uses them
)
SPECIAL = ("bos", "eos", "pad")


# --------------------------------------------------------------------------- tokenizer files


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
    """Copies a model directory's tokenizer files; returns the sha256 of the one jaxlm reads.

    Nothing is copied from a directory without a tokenizer: its side files alone (generation
    config, chat template) would make `dst_dir` look like a tokenizer to whoever reads it next.
    """
    present = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
    if not present or not find_tokenizer(src_dir):
        return ""
    os.makedirs(dst_dir, exist_ok=True)
    for name in present:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    return file_sha256(find_tokenizer(dst_dir)) if find_tokenizer(dst_dir) else ""


def keep_with_run(tokenizer_file: str, sha256: str, workdir: str) -> None:
    """Copies the Hugging Face files beside a run's tokenizer into `<workdir>/tokenizer/`, so an
    export of the run keeps the base model's special tokens, BOS rule and chat template.

    Only when `tokenizer_file` is the one the run's data was tokenized with (`sha256`) and comes
    from a model directory (a tokenizer_config.json beside it); otherwise nothing is copied.
    """
    source = os.path.dirname(os.path.abspath(os.path.expanduser(tokenizer_file)))
    if not os.path.isfile(os.path.join(source, "tokenizer_config.json")):
        return
    if file_sha256(os.path.expanduser(tokenizer_file)) == sha256:
        copy_files(source, os.path.join(workdir, "tokenizer"))


def special_ids(directory: str, tok: Any) -> dict[str, int | None]:
    """bos/eos/pad ids of a model directory's tokenizer files, for config.json and generate().

    generation_config.json first (what the source model generates with), then the tokens named
    in tokenizer_config.json / special_tokens_map.json, then what the tokenizer file implies.
    """
    ids = {f"{k}_token_id": None for k in SPECIAL}
    generation = _read_json(os.path.join(directory, "generation_config.json"))
    named = {
        **_read_json(os.path.join(directory, "special_tokens_map.json")),
        **_read_json(os.path.join(directory, "tokenizer_config.json")),
    }
    for kind in SPECIAL:
        key = f"{kind}_token_id"
        token = named.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(generation.get(key), (int, list)):
            ids[key] = generation[key]
        elif isinstance(token, str) and tok.piece_to_id(token) is not None:
            ids[key] = tok.piece_to_id(token)
        else:
            implied = getattr(tok, f"{kind}_id")
            ids[key] = implied if implied >= 0 else None
    return ids


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


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
    tok, is_json = load(file), is_tokenizer_json(file)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isdir(source):
        special = special_ids(source, tok)
        copy_files(source, out_dir)
        if os.path.isfile(os.path.join(source, "tokenizer_config.json")):
            _write_special_tokens_map(out_dir, tok, special)
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
    special = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id if tok.pad_id >= 0 else None,
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
    _write_special_tokens_map(out_dir, tok, special)
    return special


def _write_special_tokens_map(out_dir: str, tok: Any, special: dict[str, Any]) -> None:
    """special_tokens_map.json naming the tokens of `special`'s ids, unless one was copied."""
    path = os.path.join(out_dir, "special_tokens_map.json")
    if os.path.isfile(path):
        return
    tokens = {}
    for kind in SPECIAL:
        i = special.get(f"{kind}_token_id")
        i = i[0] if isinstance(i, list) and i else i
        if isinstance(i, int) and i >= 0:
            tokens[f"{kind}_token"] = tok.id_to_piece(i)
    if getattr(tok, "unk_id", -1) >= 0:
        tokens["unk_token"] = tok.id_to_piece(tok.unk_id)
    with open(path, "w") as f:
        json.dump(tokens, f, indent=2)
