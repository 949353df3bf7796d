"""Whether text being evaluated was in a run's training data.

A run's split is a function of content: a curated document is held out iff its content hash
falls under `data.val_fraction` (`content_split.split_of`). So for a file that is one of the run's
dataset files, reading it as preparation did (the dataset's `split` and `text_field`), curating
it with the run's rules and hashing each document tells which of its documents were trained on,
without opening the prepared shards. Not modelled (rare, and only ever toward "held out"): a
document dropped as a duplicate of another file's, or because a validation set holds its text.
"""

from __future__ import annotations

import os
from typing import Any


def documents_trained_on(config: Any, paths: str) -> tuple[int, int]:
    """(documents of `paths` in the run's training split, documents of `paths` in its corpus).

    Args:
      config: the run's ConfigDict (its `data.datasets`, `data.curation`, `data.val_fraction`).
      paths: the evaluated files (a comma-separated list of files, globs or directories).
    """
    from jaxlm.data import content_split, curate, prepare, sources

    wanted = {os.path.realpath(f.path) for f in sources.resolve_files(paths)}
    trained = in_corpus = 0
    for ds in prepare.dataset_configs(config.data).values():
        files = [f for f in sources.resolve_files(ds.paths) if os.path.realpath(f.path) in wanted]
        curator = curate.Curator(config.data.curation, ds.get("quality_preset", None))
        problems = sources.Problems()
        for f in files:
            text_field, split = ds.get("text_field", "text"), ds.get("split", "file")
            for doc in sources.read_file(f, problems, text_field, split):
                kept = curator.process(doc)
                if kept is None:  # curation dropped it: never trained on
                    continue
                in_corpus += 1
                trained += content_split.split_of(kept["text"], config.data.val_fraction) == "train"
    return trained, in_corpus
