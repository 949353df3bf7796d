"""tools/evaluate.py's training-data flag: the documents `seen.documents_trained_on` calls
trained on are exactly those the prepared training shards hold, read back from the shards."""

import os

import ml_collections
import pytest

from jaxlm.data import curate, sources
from jaxlm.evaluate import seen
from tests.helpers import decoded_shards

pytestmark = pytest.mark.usefixtures("no_home_cache")


def test_the_flag_matches_the_prepared_split_file_by_file(stdlib_corpus, stdlib_prepared):
    path, data_cfg, *_ = stdlib_prepared
    shards = decoded_shards(path)
    config = ml_collections.ConfigDict({"data": data_cfg})
    counts = {"train": 0, "val": 0}
    for f in sources.resolve_files(str(stdlib_corpus / "code")):
        trained, in_corpus = seen.documents_trained_on(config, f.path)
        curator = curate.Curator(data_cfg.curation)  # the file alone, as the flag curates it
        kept = [curator.process(d) for d in sources.read_file(f, sources.Problems())]
        texts = [d["text"] for d in kept if d is not None]
        assert in_corpus == len(texts)
        if not all(t in shards["train"] + shards["val"] for t in texts):
            continue  # dropped as a duplicate of an earlier file (module docstring): not modelled
        assert trained == sum(t in shards["train"] for t in texts), f.name
        assert in_corpus - trained == sum(t in shards["val"] for t in texts), f.name
        counts["train" if trained else "val"] += bool(in_corpus)
    assert counts["train"] > 10 and counts["val"] > 2  # both kinds of file were checked

    outside = stdlib_corpus / "not_in_the_corpus.py"
    outside.write_text("print('hello')\n")
    try:
        assert seen.documents_trained_on(config, str(outside)) == (0, 0)
    finally:
        os.remove(outside)
