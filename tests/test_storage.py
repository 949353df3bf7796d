"""Object storage: the corpus, the prepared data and the workdir in an S3 bucket.

One local S3 server (moto's) serves the whole session. A run whose corpus, prepared-data cache
and workdir are all in the bucket gives the local run's losses to the bit, resumes bitwise
after kill -9, falls back from a corrupt newest checkpoint, and every bucket failure is one
sentence naming the path.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import pytest

from jaxlm import storage
from jaxlm.errors import JaxlmError
from tests.helpers import one_sentence
from tests.test_e2e import CONFIG_TEMPLATE, REPO, run, start

BUCKET = "jaxlm-test"
STDLIB = sysconfig.get_paths()["stdlib"]
CORPUS_DIRS = ("json", "email")  # a few hundred KB: the tokenizer and 12 steps have enough


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A local S3 server for the session, its bucket, and the environment that points there."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "JAXLM_LOCAL_CACHE": str(tmp_path_factory.mktemp("local_copies")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _upload_corpus(s3) -> str:
    """The corpus copied into the bucket once; returns its comma-separated bucket paths."""
    paths = []
    for d in CORPUS_DIRS:
        remote = storage.join(s3, "corpus", d)
        if not storage.exists(remote):
            storage._fs(remote).put(os.path.join(STDLIB, d), remote, recursive=True)
        paths.append(remote)
    return ",".join(paths)


def _config(tmp_path, name: str, paths: str, cache: str) -> str:
    """A config file (test_e2e's tiny run) preparing `paths` into `cache` itself."""
    text = CONFIG_TEMPLATE.format(manifest="").replace(
        "    return c\n",
        f"    c.data.datasets.stdlib.paths = {paths!r}\n"
        f"    c.data.cache_dir = {cache!r}\n"
        "    c.data.val_fraction = 0.1\n"
        "    c.tokenizer.vocab_size = 640\n"
        "    return c\n",
    )
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return str(path)


def _bucket_losses(workdir: str) -> dict[int, float]:
    out = {}
    for line in storage.read_bytes(storage.join(workdir, "metrics.jsonl")).decode().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            assert row["step"] not in out, f"step {row['step']} logged twice"
            out[row["step"]] = row["train/loss"]
    return out


@pytest.mark.slow
def test_a_run_in_buckets_equals_the_local_run_resumes_after_kill_and_falls_back(s3, tmp_path):
    local_paths = ",".join(os.path.join(STDLIB, d) for d in CORPUS_DIRS)
    local_cfg = _config(tmp_path, "local", local_paths, str(tmp_path / "cache"))
    run(local_cfg, str(tmp_path / "local"))
    local_losses = {}
    with open(tmp_path / "local" / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if "train/loss" in row:
                local_losses[row["step"]] = row["train/loss"]
    assert len(local_losses) == 12

    bucket_cfg = _config(tmp_path, "bucket", _upload_corpus(s3), storage.join(s3, "cache"))
    workdir = storage.join(s3, "run")
    proc = start(bucket_cfg, workdir)
    marker = storage.join(workdir, "checkpoints", "4", storage.MARKER)
    while not storage.exists(marker):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not storage.exists(storage.join(workdir, "checkpoints", "12"))
    shutil.rmtree(storage.local_root())  # a fresh machine: the bucket alone holds the run
    restarted = run(bucket_cfg, workdir)
    assert "resuming from checkpoint at step" in restarted.stdout
    assert "downloaded prepared data from s3://" in restarted.stdout
    assert _bucket_losses(workdir) == local_losses  # floats from JSON: equal to the bit

    # The prepared data in the bucket is whole: its manifest was uploaded last.
    caches = storage.listdir(storage.join(s3, "cache"))
    prepared = storage.join(s3, "cache", caches[0])
    assert len(caches) == 1 and storage.is_published(prepared, marker="manifest.json")

    # Export from the bucket workdir into the bucket: the local run's weights, to the byte.
    from jaxlm.convert import hf

    exported = storage.join(s3, "hf")
    tool = [sys.executable, "tools/convert_hf.py", "export", f"--workdir={workdir}"]
    subprocess.run([*tool, f"--out_dir={exported}"], cwd=REPO, check=True, capture_output=True)
    hf.export_hf(str(tmp_path / "local"), str(tmp_path / "hf"), progress=False)
    assert storage.is_published(exported)
    weights = storage.read_bytes(storage.join(exported, "model.safetensors"))
    assert weights == (tmp_path / "hf" / "model.safetensors").read_bytes()

    state = storage.join(workdir, "checkpoints", "12", "state")
    for rel in storage.files_under(state):
        if "ocdbt" in rel or rel.rsplit("/", 1)[-1].startswith("d"):
            storage.write_bytes(storage.join(state, rel), b"corrupt")
    resumed = run(bucket_cfg, workdir, "--config.train.steps=14")
    assert "resuming from checkpoint at step 8" in resumed.stdout
    assert "checkpoint at step 12 is unreadable" in resumed.stderr
    assert max(_bucket_losses(workdir)) == 14


def test_bucket_failures_are_one_sentence_naming_the_path(s3, monkeypatch):
    missing = "s3://no-such-bucket-jaxlm/run"
    with pytest.raises(JaxlmError) as e:
        storage.check_writable(missing, "--workdir")
    assert "no-such-bucket-jaxlm" in one_sentence(e) and "does not exist" in str(e.value)

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(JaxlmError) as e:
        storage.glob(f"{s3}/corpus/*.txt")
    assert one_sentence(e).startswith(f"no credentials for {s3}/corpus/*.txt")
    monkeypatch.undo()

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    tries = []
    real = storage._fs
    monkeypatch.setattr(storage, "_fs", lambda p: tries.append(p) or real(p))
    with pytest.raises(JaxlmError) as e:
        storage.exists(f"{s3}/run/metrics.jsonl")
    assert one_sentence(e).startswith(f"could not reach the storage of {s3}/run/metrics.jsonl")
    assert len(tries) == storage.RETRIES
