"""Small file helpers shared by the data modules, so none of them imports another for these.

`tokenizer`, `hf_tokenizer`, `records`, `manifest` and `prepare` all hash or atomically write
files; keeping those helpers here (importing nothing from jaxlm) keeps the data modules' import
graph one-way.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes (how manifests and checkpoints name a tokenizer or shard)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically: readers see the old file or the new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
