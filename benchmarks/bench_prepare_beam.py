"""Benchmark: corpus preparation on Beam's DirectRunner vs the local path, same input.

    python benchmarks/bench_prepare_beam.py --config=configs/tiny.py --workers=2 \\
        --mode=multi_processing [--config.data.datasets.stdlib.paths=...]

Prepares the config's datasets twice from cold caches (temporary folders): with
``prepare.prepare`` (tokenization on ``data.num_proc`` processes) and with ``beam.prepare_beam``
(DirectRunner, ``--workers`` workers in ``--mode``). Prints one markdown row per run: input
MB, wall seconds, MB/s of input, and whether the two manifests describe the same data
(``manifest.content``: tokenizer hash, shard sha256s, counts, curation). Numbers go in
docs/perf.md; this is not a test.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ml_collections import config_flags  # noqa: E402

from jaxlm import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_WORKERS = flags.DEFINE_integer("workers", 2, "DirectRunner workers (direct_num_workers).")
_MODE = flags.DEFINE_enum(
    "mode",
    "multi_processing",
    ["in_memory", "multi_threading", "multi_processing"],
    "DirectRunner running mode.",
)


def main(argv: list[str]) -> None:
    del argv
    import logging

    from jaxlm.data import beam, manifest, prepare

    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    config = _CONFIG.value
    quiet = lambda s: None  # noqa: E731
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("local", "beam"):
            config.data.cache_dir = os.path.join(tmp, engine)
            t = time.perf_counter()
            if engine == "local":
                path = prepare.prepare(config.data, config.tokenizer, log=quiet)
            else:
                args = [
                    "--runner=DirectRunner",
                    f"--direct_num_workers={_WORKERS.value}",
                    f"--direct_running_mode={_MODE.value}",
                ]
                path = beam.prepare_beam(config.data, config.tokenizer, args, log=quiet)
            runs[engine] = (time.perf_counter() - t, manifest.load(path))
    same = manifest.content(runs["local"][1]) == manifest.content(runs["beam"][1])
    m = runs["local"][1]
    mb = sum(r["bytes_in"] for r in m["curation"].values()) / 1e6
    docs = sum(ds[s]["documents"] for ds in m["datasets"].values() for s in prepare.SPLITS)
    paths = ", ".join(d.paths for d in config.data.datasets.values())
    print("| input | MB in | docs out | engine | seconds | MB/s | same data |")
    print("| --- | ---: | ---: | --- | ---: | ---: | --- |")
    for engine, (seconds, _) in runs.items():
        how = (
            f"local (num_proc={config.data.num_proc})"
            if engine == "local"
            else f"Beam DirectRunner {_WORKERS.value} × {_MODE.value}"
        )
        print(
            f"| {paths} | {mb:.1f} | {docs:,} | {how} | {seconds:.1f} | {mb / seconds:.2f} | "
            f"{'yes' if same else 'NO'} |"
        )
    if not same:
        sys.exit("error: the Beam path and the local path prepared different data.")


if __name__ == "__main__":
    cli.run_cli(main)
