"""Prepare a corpus: curate, split, train the tokenizer, write ArrayRecord shards + manifest.

    python tools/prepare_data.py --config=configs/tiny.py
    python tools/prepare_data.py --config=configs/tiny.py \\
        --config.data.datasets.stdlib.paths='~/corpus/*.jsonl.zst' --config.data.num_proc=8

Multi-host: run on every host with --process_index/--process_count (or, with
--use_jax_process, from ``jax.process_index()/jax.process_count()`` after
``jax.distributed.initialize()``); the cache directory must be on a shared filesystem.
A second run with the same inputs prints "using prepared data at ..." and returns at once.

The cache (``data.cache_dir``, else $JAXLM_CACHE, else ~/.cache/jaxlm):

    python tools/prepare_data.py --list                    # size and last use of each
    python tools/prepare_data.py --prune --prune_days=30   # remove unused ones and leftovers
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

# Config files do `from configs import base`; make the repository root importable from anywhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import cli  # noqa: E402
from jaxlm.errors import JaxlmError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_PROCESS_INDEX = flags.DEFINE_integer("process_index", 0, "This host's index among the hosts.")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", 1, "Number of hosts preparing the data.")
_USE_JAX = flags.DEFINE_bool(
    "use_jax_process", False, "Take process index/count from jax (after distributed init)."
)
_LIST = flags.DEFINE_bool("list", False, "List the cached preparations (size, last use); exit.")
_PRUNE = flags.DEFINE_bool(
    "prune", False, "Remove killed preparations and those unused for --prune_days; exit."
)
_PRUNE_DAYS = flags.DEFINE_float("prune_days", 30.0, "With --prune: days unused before removal.")


def main(argv: list[str]) -> None:
    del argv
    from jaxlm import objectives
    from jaxlm.data import prepare

    config = _CONFIG.value
    if _LIST.value or _PRUNE.value:
        from jaxlm.data import cache, sources

        root = sources.cache_root(config.data.cache_dir if config is not None else "")
        if _PRUNE.value:
            gone = cache.prune(root, _PRUNE_DAYS.value)
            print(f"removed from {root}:\n{cache.table(gone)}")
        else:
            print(f"{root}:\n{cache.table(cache.entries(root))}")
        return
    if config is None:  # --list and --prune alone need none
        raise JaxlmError("--config is required, e.g. --config=configs/tiny.py.")
    index, count = _PROCESS_INDEX.value, _PROCESS_COUNT.value
    if _USE_JAX.value:
        import jax  # imported only here: worker processes never need it

        index, count = jax.process_index(), jax.process_count()
    path = prepare.prepare(
        config.data,
        objectives.tokenizer_config(config),
        process_index=index,
        process_count=count,
    )
    print(path)


if __name__ == "__main__":
    cli.run_cli(main, require_config=False)
