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
import socket
import subprocess
import sys
import sysconfig
import time

import pytest

from jaxlm import storage
from jaxlm.errors import JaxlmError
from tests.helpers import one_sentence, train_losses
from tests.test_e2e import CONFIG_TEMPLATE, run, start

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
def test_a_run_in_buckets_equals_the_local_run_after_kill_and_a_corrupt_checkpoint(s3, tmp_path):
    local_paths = ",".join(os.path.join(STDLIB, d) for d in CORPUS_DIRS)
    local_cfg = _config(tmp_path, "local", local_paths, str(tmp_path / "cache"))
    run(local_cfg, str(tmp_path / "local"))
    local_losses = train_losses(tmp_path / "local")
    assert len(local_losses) == 12

    # The bucket run stops for good at its 11th batch, after step 8's checkpoint is published.
    bucket_cfg = _config(tmp_path, "bucket", _upload_corpus(s3), storage.join(s3, "cache"))
    workdir = storage.join(s3, "run")
    proc = start(bucket_cfg, workdir, "--config.train.inject_hang_at=11")
    deadline = time.monotonic() + 600
    while not storage.exists(storage.join(workdir, "checkpoints", "8", storage.MARKER)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.kill() or proc.stderr
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert storage.listdir(storage.join(workdir, "checkpoints")) == ["4", "8"]
    caches = storage.listdir(storage.join(s3, "cache"))  # published, its manifest last
    assert len(caches) == 1
    assert storage.is_published(storage.join(s3, "cache", caches[0]), marker="manifest.json")

    # The newest checkpoint corrupt in the bucket; a fresh machine (no local copies).
    state = storage.join(workdir, "checkpoints", "8", "state")
    for rel in storage.files_under(state):
        if "ocdbt" in rel or rel.rsplit("/", 1)[-1].startswith("d"):
            storage.write_bytes(storage.join(state, rel), b"corrupt")
    shutil.rmtree(storage.local_root())
    restarted = run(bucket_cfg, workdir)
    assert "downloaded prepared data from s3://" in restarted.stdout
    assert "checkpoint at step 8 is unreadable" in restarted.stderr
    assert "resuming from checkpoint at step 4" in restarted.stdout
    assert _bucket_losses(workdir) == local_losses  # floats from JSON: equal to the bit

    # Export from the bucket workdir into the bucket: the local run's weights, to the byte.
    from jaxlm.convert import hf

    exported = storage.join(s3, "hf")
    hf.export_hf(workdir, exported, progress=False)
    hf.export_hf(str(tmp_path / "local"), str(tmp_path / "hf"), progress=False)
    assert storage.is_published(exported)
    weights = storage.read_bytes(storage.join(exported, "model.safetensors"))
    assert weights == (tmp_path / "hf" / "model.safetensors").read_bytes()


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


@pytest.mark.slow
def test_beam_reads_the_corpus_from_and_writes_the_preparation_to_the_bucket(s3, tmp_path):
    from jaxlm.data import beam, manifest, prepare
    from tests.helpers import Log, copy_stdlib_subset, data_configs, decoded_shards

    copy_stdlib_subset(tmp_path / "code", 41, 3, 12)
    corpus = storage.join(s3, "beam_corpus")
    storage._fs(corpus).put(str(tmp_path / "code"), corpus, recursive=True)
    local_cfg, tok_cfg = data_configs(str(tmp_path / "code"), tmp_path / "cache", docs_per_shard=4)
    local = prepare.prepare(local_cfg, tok_cfg, log=Log())
    bucket_cfg, _ = data_configs(corpus, tmp_path / "unused", docs_per_shard=4)
    out = storage.join(s3, "beam_out")
    written = beam.prepare_beam(bucket_cfg, tok_cfg, ["--runner=DirectRunner"], out, log=Log())
    assert written == storage.join(out, "manifest.json")
    assert storage.is_published(out, marker="manifest.json")
    copy = prepare.local_manifest(out)
    assert decoded_shards(copy) == decoded_shards(local)
    assert _shard_files(manifest.load(copy)) == _shard_files(manifest.load(local))


def _shard_files(m: dict) -> list[tuple[str, str]]:
    """(path, sha256) of each shard of the 'code' dataset: equal when the bytes are."""
    code = m["datasets"]["code"]
    return [(s["path"], s["sha256"]) for split in ("train", "val") for s in code[split]["shards"]]


def test_a_refused_key_and_a_denied_write_are_one_sentence(tmp_path, monkeypatch):
    # A second server that enforces IAM after its first 3 calls (moto reads the setting at
    # start-up, so it runs in its own process): a bucket, a user and the user's key, no policy.
    import boto3
    import botocore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        admin = dict(endpoint_url=endpoint, region_name="us-east-1")
        admin.update(aws_access_key_id="admin", aws_secret_access_key="admin")
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3", **admin).create_bucket(Bucket="locked")
                break
            except botocore.exceptions.EndpointConnectionError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.1)
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        with pytest.raises(JaxlmError) as e:
            storage.check_writable("s3://locked/run", "--workdir")
        assert one_sentence(e).startswith("--workdir: permission denied on s3://locked/run/")

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
        with pytest.raises(JaxlmError) as e:
            storage.glob("s3://locked/corpus/*.txt")
        msg = one_sentence(e)
        assert msg.startswith("the credentials were refused for s3://locked/corpus/*.txt")
    finally:
        server.kill()
        server.wait()
