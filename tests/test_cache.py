"""The prepared-data cache: listing with size and last use, pruning old and killed ones."""

import json
import os
import time

from jaxlm.data import cache


def _folder(root, name, nbytes, manifest=True, age_days=0.0):
    path = root / name
    path.mkdir()
    (path / "shard.bin").write_bytes(b"x" * nbytes)
    if manifest:
        m = {"config": {"datasets": {"code": {"paths": "/data/*.py"}}}}
        (path / "manifest.json").write_text(json.dumps(m))
        t = time.time() - age_days * 86400
        os.utime(path / "manifest.json", (t, t))
    return path


def test_list_and_prune_by_last_use(tmp_path):
    old = _folder(tmp_path, "aaaa", 3000, age_days=40)
    fresh = _folder(tmp_path, "bbbb", 1000, age_days=1)
    killed = _folder(tmp_path, ".tmp-cccc-1234", 500, manifest=False)
    items = cache.entries(str(tmp_path))
    assert [e.path for e in items] == [str(old), str(fresh), str(killed)]  # least recent first
    assert [e.complete for e in items] == [True, True, False]
    assert items[0].bytes >= 3000 and items[0].datasets == "code=/data/*.py"
    assert "aaaa" in cache.table(items) and "in 3 folder(s)" in cache.table(items)

    cache.touch(str(old / "manifest.json"))  # a use: prepare found it in the cache
    gone = cache.prune(str(tmp_path), older_than_days=30)
    assert [e.path for e in gone] == [str(killed)]
    gone = cache.prune(str(tmp_path), older_than_days=0.5)
    assert [e.path for e in gone] == [str(fresh)]
    assert sorted(os.listdir(tmp_path)) == ["aaaa"]
