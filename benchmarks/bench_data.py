"""Data-pipeline benchmark: loader tokens/s against the train step's, and tokenization MB/s.

    python benchmarks/bench_data.py --config=configs/tiny.py [--batches=2500] [--corpus=PATH ...]

(a) Loader: tokens/s delivered by `stream.TrainBatches` (the trainer's reader) for the config's
    first stage over the config's prepared data (`prepare` runs or finds its cache), timed after
    a warm-up.
(b) Step: tokens/s of the config's jitted train step on real batches from that loader, after
    compile. The ratio loader/step must be >= 10: the input pipeline may not be what a run
    waits for.
(c) Tokenization: each --corpus file (default: the .txt files in ../shared/data beside the
    repository, skipped with a note when absent) goes through the real `prepare` path into a
    temporary cache, one dataset per file; MB/s is that of prepare's tokenize stage (worker
    pool, `data.num_proc`), plus single-thread `Tokenizer.encode` MB/s of the whole file.

(d) With --bucket: the prepared data read from a bucket on a local S3 server (moto's, started
    here) against the same data on local disk, back to back: a bucket preparation is
    downloaded once into the local copy (ArrayRecord reads local files; jaxlm.storage), then
    read as local shards. Printed: the download time, and the ratio of first-batch-plus-
    --batches wall time, bucket over local (target <= 1.5x).

Every number is wall-clock on this machine; the 1-minute load average is printed before and
after, since other processes on a shared machine slow every column.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import os
import shutil
import sys
import tempfile
import time
from typing import Any

# Config files do `from configs import base`; make the repository root importable from anywhere.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import ml_collections  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# jax is imported inside functions: --help and flag errors should not pay for it.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_BATCHES = flags.DEFINE_integer("batches", 2500, "Timed loader batches.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed loader batches before timing.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps (after compile and 2 warm-up steps).")
_CORPUS = flags.DEFINE_multi_string(
    "corpus",
    None,
    "Text/JSONL corpus files to time tokenization on (default: ../shared/data/*.txt).",
)
_SPLIT = flags.DEFINE_bool(
    "split_paragraphs", True, "Corpora: one document per blank-line-separated paragraph."
)
_PRESET = flags.DEFINE_string("quality_preset", "none", "Corpora: curation quality preset.")
_CORPUS_BATCHES = flags.DEFINE_integer(
    "corpus_batches", 200, "Timed loader batches over the corpora's short paragraph documents."
)

_BUCKET = flags.DEFINE_bool(
    "bucket", False, "(d): read the prepared data from a local S3 server vs local disk."
)

SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
REQUIRED_RATIO = 10.0


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. '3.10 4.28 4.94'."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- (a) loader


def time_loader(
    config: Any,
    manifest: dict,
    batches: int,
    warmup: int,
    weights: dict[str, float] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Tokens/s of `stream.TrainBatches` for the config's first stage.

    `weights` replace the config's mixture weights (by dataset name).

    Returns:
      The timings (first batch s, tokens/s, ms/batch) and the timed batches themselves.
    """
    from benchmarks import timing
    from jaxlm import spec as run_spec
    from jaxlm.data import stream

    if weights:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.stages = ()
            config.data.datasets = {n: dict(paths="-", weight=w) for n, w in weights.items()}
    plan = run_spec.build(config).plan
    B, L = plan.stages[0].batch_size, plan.stages[0].seq_len
    t0 = time.perf_counter()
    reader = stream.TrainBatches(
        manifest,
        plan,
        seed=config.seed,
        streams=config.data.streams or 1,
        process_index=0,
        process_count=1,
    )
    next(reader)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        next(reader)
    dt, out = timing.timed(lambda: [next(reader) for _ in range(batches)])
    return {"first_s": first, "tokens_s": batches * B * L / dt, "ms_batch": 1e3 * dt / batches}, out


def time_bucket(config: Any, manifest_path: str, batches: int) -> dict[str, float]:
    """(d): the loader's wall time over a bucket copy of the preparation (its download into the
    local copy included) against local disk, on a moto S3 server started in this process."""
    import boto3
    from moto.server import ThreadedMotoServer

    from jaxlm import storage
    from jaxlm.data import manifest as manifest_lib
    from jaxlm.data import prepare

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        JAXLM_LOCAL_CACHE=tempfile.mkdtemp(prefix="jaxlm-bench-bucket-"),
    )
    try:
        boto3.client("s3").create_bucket(Bucket="bench")
        remote = "s3://bench/prepared"
        storage.publish_dir(os.path.dirname(manifest_path), remote, marker=manifest_lib.FILE)
        t0 = time.perf_counter()
        local = time_loader(config, manifest_lib.load(manifest_path), batches, 0)[0]
        local_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        copy = prepare.local_manifest(remote)
        fetch_s = time.perf_counter() - t0
        bucket = time_loader(config, manifest_lib.load(copy), batches, 0)[0]
        bucket_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(os.environ["JAXLM_LOCAL_CACHE"], ignore_errors=True)
        server.stop()
    return {
        "local_s": local_s,
        "bucket_s": bucket_s,
        "fetch_s": fetch_s,
        "ratio": bucket_s / local_s,
        "local_tokens_s": local["tokens_s"],
        "bucket_tokens_s": bucket["tokens_s"],
    }


# --------------------------------------------------------------------------- (b) train step


def time_train_step(
    config: Any, vocab_size: int, batches: list[dict], steps: int
) -> dict[str, float]:
    """Tokens/s of the config's jitted train step on real loader batches, after compile."""
    import jax

    from benchmarks import timing
    from jaxlm import sharding, train
    from jaxlm import spec as run_spec

    mesh = sharding.make_mesh(config.mesh.shape)
    setup = train.Setup(run_spec.build(config), vocab_size, mesh)
    state = setup.init_state()
    step = setup.jit_train_step()
    B, L = config.train.batch_size, config.train.seq_len

    def run_steps(first: int, n: int):
        nonlocal state
        for i in range(first, first + n):
            batch = batches[i % len(batches)]
            state, metrics = step(state, sharding.host_to_global(batch, mesh))
        return metrics

    compile_s, _ = timing.timed(run_steps, 0, 1)
    timing.timed(run_steps, 1, 2)  # warm-up
    dt, metrics = timing.timed(run_steps, 3, steps)
    return {
        "params_m": setup.n_params / 1e6,
        "devices": jax.device_count(),
        "compile_s": compile_s,
        "tokens_s": steps * B * L / dt,
        "ms_step": 1e3 * dt / steps,
        "loss": float(metrics["loss"]),
    }


# --------------------------------------------------------------------------- (c) tokenization


def default_corpora() -> list[str]:
    """The .txt corpora in ../shared/data beside the repository, if that folder exists."""
    return sorted(glob.glob(os.path.join(SHARED_DATA, "*.txt")))


def corpus_config(config: Any, paths: list[str], cache_dir: str) -> ml_collections.ConfigDict:
    """`config` with one dataset per corpus file, prepared into `cache_dir`."""
    c = copy.deepcopy(config)
    c.unlock()
    c.data.manifest = ""
    c.data.cache_dir = cache_dir
    datasets = ml_collections.ConfigDict()
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0].replace(".", "_")
        datasets[name] = ml_collections.ConfigDict(
            dict(
                paths=path,
                text_field="text",
                weight=1.0,
                split="paragraphs" if _SPLIT.value else "file",
                quality_preset=_PRESET.value,
            )
        )
    c.data.datasets = datasets
    return c


@contextlib.contextmanager
def timed_tokenize_stage(timings: list[tuple[str, float, int, int]]):
    """Records (label, seconds, bytes, tokens) of every shard set prepare's encoder writes.

    prepare prints each stage's MB/s to stderr with one decimal; wrapping the encoder reads
    the same stage exactly, on the real code path.
    """
    from jaxlm.data import records

    original = records.Encoder.write_shards

    def write_shards(self, texts, root, pattern, docs_per_shard, label="tokenize", **options):
        t0 = time.perf_counter()
        shards, mbps = original(self, texts, root, pattern, docs_per_shard, label, **options)
        nbytes = sum(s.bytes for s in shards)
        tokens = sum(s.tokens for s in shards)
        timings.append((label, time.perf_counter() - t0, nbytes, tokens))
        return shards, mbps

    records.Encoder.write_shards = write_shards
    try:
        yield
    finally:
        records.Encoder.write_shards = original


def time_tokenization(config: Any, paths: list[str]) -> list[dict[str, Any]]:
    """Prepares the corpora into a temporary cache and returns one row of numbers per corpus."""
    from jaxlm.data import manifest, prepare, records, sources, tokenizer

    cache = tempfile.mkdtemp(prefix="bench_data_")
    try:
        c = corpus_config(config, paths, cache)
        timings: list[tuple[str, float, int, int]] = []
        t0 = time.perf_counter()
        with timed_tokenize_stage(timings):
            manifest_path = prepare.prepare(c.data, c.tokenizer)
        prepare_s = time.perf_counter() - t0
        m = manifest.load(manifest_path)
        tok = tokenizer.load(manifest.tokenizer_path(m))
        rows = []
        for name, ds_cfg in c.data.datasets.items():
            mine = [t for t in timings if t[0].split(" ")[-1].split("/")[0] == name]
            seconds = sum(t[1] for t in mine)
            nbytes = sum(t[2] for t in mine)
            tokens = sum(t[3] for t in mine)
            with open(ds_cfg.paths, "rb") as f:
                raw = f.read()
            text = sources.normalize_newlines(raw.decode("utf-8", errors="replace"))
            t1 = time.perf_counter()
            whole = len(tok.encode(text))
            encode_s = time.perf_counter() - t1
            cur = m["curation"][name]
            rows.append(
                {
                    "name": name,
                    "file_mb": len(raw) / 1e6,
                    "docs_in": cur["documents_in"],
                    "docs_out": cur["documents_out"],
                    "mb_out": cur["bytes_out"] / 1e6,
                    "tokens": tokens,
                    "bytes_per_token": nbytes / max(tokens, 1),
                    "stage_mbps": nbytes / 1e6 / max(seconds, 1e-9),
                    "encode_mbps": len(text.encode("utf-8")) / 1e6 / max(encode_s, 1e-9),
                    "encode_tokens": whole,
                }
            )
        meta = {
            "prepare_s": prepare_s,
            "num_proc": records.resolve_num_proc(int(c.data.num_proc)),
            "vocab": tok.vocab_size,
            "model_type": c.tokenizer.model_type,
        }
        # The same loader over the corpus with the most (short, paragraph) documents: the
        # per-document cost shows here, not on stdlib's long files.
        name = max(m["datasets"], key=lambda n: m["datasets"][n]["train"]["documents"])
        train = m["datasets"][name]["train"]
        meta["loader_corpus"] = name
        meta["tokens_per_doc"] = train["tokens"] / max(train["documents"], 1)
        meta["loader"], _ = time_loader(
            c, m, _CORPUS_BATCHES.value, _WARMUP.value, weights={name: 1.0}
        )
        for r in rows:
            r.update(meta)
        return rows
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# --------------------------------------------------------------------------- report


def run(config: Any, corpora: list[str] | None) -> None:
    from jaxlm.data import manifest as manifest_lib
    from jaxlm.data import prepare

    before = load_average()
    B, L = config.train.batch_size, config.train.seq_len
    print(f"== bench_data: {config.get('name', '?')} | B={B} L={L} | {os.cpu_count()} CPUs ==")
    print(f"load average before: {before}")

    if config.data.manifest:
        manifest_path = config.data.manifest
    else:
        manifest_path = prepare.prepare(config.data, config.tokenizer)
    manifest = manifest_lib.load(manifest_path)
    train_tokens = sum(d["train"]["tokens"] for d in manifest["datasets"].values())

    loader, batches = time_loader(config, manifest, _BATCHES.value, _WARMUP.value)
    print(f"loader: {loader['tokens_s']:,.0f} tokens/s")

    step = time_train_step(config, manifest["tokenizer"]["vocab_size"], batches, _STEPS.value)
    print(f"train step: {step['tokens_s']:,.0f} tokens/s")

    if corpora is None:
        corpora = default_corpora()
        note = "" if corpora else f"skipped: {SHARED_DATA} not found; pass --corpus=PATH"
    else:
        note = ""
    tok_rows = time_tokenization(config, corpora) if corpora else []
    after = load_average()

    print()
    print(
        f"(a) loader: TrainBatches over {len(manifest['datasets'])} dataset(s), "
        f"{train_tokens:,} train tokens, streams={config.data.streams or 1}, "
        f"{_BATCHES.value} batches timed after {_WARMUP.value} warm-up"
    )
    print(f"    {'tokens/s':>12} {'ms/batch':>9} {'first batch':>12}")
    r = loader
    print(f"    {r['tokens_s']:>12,.0f} {r['ms_batch']:>9.1f} {r['first_s']:>10.2f} s")
    print(
        f"(b) train step: {step['params_m']:.2f}M params, {step['devices']} device(s), "
        f"compile {step['compile_s']:.1f} s, {_STEPS.value} steps timed, "
        f"loss {step['loss']:.3f}"
    )
    print(f"    {step['tokens_s']:,.0f} tokens/s, {step['ms_step']:.1f} ms/step")
    ratio = loader["tokens_s"] / step["tokens_s"]
    verdict = "ok" if ratio >= REQUIRED_RATIO else f"BELOW the required {REQUIRED_RATIO:.0f}x"
    print(f"    loader/step ratio: {ratio:,.1f}x ({verdict})")
    print("(c) tokenization" + (f": {note}" if note else ""))
    if tok_rows:
        r0 = tok_rows[0]
        print(
            f"    prepare of all corpora: {r0['prepare_s']:.1f} s ({r0['model_type']} vocab "
            f"{r0['vocab']} trained on them; split_paragraphs={_SPLIT.value}, quality preset "
            f"{_PRESET.value!r})\n    stage = prepare's tokenize stage with {r0['num_proc']} "
            "worker process(es); 1-thread = Tokenizer.encode of the whole file in this process"
        )
        print(
            f"    {'corpus':<18} {'file MB':>8} {'docs in':>8} {'docs out':>9} {'MB out':>7} "
            f"{'tokens':>11} {'B/token':>8} {'stage MB/s':>11} {'1-thread MB/s':>14}"
        )
        for r in tok_rows:
            print(
                f"    {r['name']:<18} {r['file_mb']:>8.2f} {r['docs_in']:>8,} "
                f"{r['docs_out']:>9,} {r['mb_out']:>7.2f} {r['tokens']:>11,} "
                f"{r['bytes_per_token']:>8.2f} {r['stage_mbps']:>11.2f} {r['encode_mbps']:>14.2f}"
            )
        lo = r0["loader"]
        print(
            f"    loader over {r0['loader_corpus']} ({r0['tokens_per_doc']:.0f} tokens/document, "
            f"{_CORPUS_BATCHES.value} batches): {lo['tokens_s']:,.0f} tokens/s = "
            f"{lo['tokens_s'] / step['tokens_s']:,.1f}x the train step"
        )
    if _BUCKET.value:
        b = time_bucket(config, manifest_path, _BATCHES.value)
        mb = sum(
            os.path.getsize(os.path.join(r, f))
            for r, _, fs in os.walk(os.path.dirname(manifest_path))
            for f in fs
        )
        print(
            f"(d) bucket (local S3 server) vs local disk, {_BATCHES.value} batches: local "
            f"{b['local_s']:.2f} s, bucket {b['bucket_s']:.2f} s of which download "
            f"{b['fetch_s']:.2f} s ({mb / 1e6:.1f} MB) -> {b['ratio']:.2f}x; steady loader "
            f"{b['bucket_tokens_s'] / b['local_tokens_s']:.2f}x local tokens/s"
        )
        after = load_average()
    print(f"load average before: {before} | after: {after}")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    corpora = _CORPUS.value
    for path in corpora or []:
        if not os.path.isfile(path):
            sys.exit(f"error: --corpus={path!r} is not a file; give a text or JSONL corpus file.")
    run(config, corpora)


if __name__ == "__main__":
    from jaxlm import cli

    cli.run_cli(main)
