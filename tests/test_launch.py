"""Launch recipes, tested: Slurm, TPU slices and Kubernetes (docs/launch.md).

Two local processes on 127.0.0.1 stand in for two hosts. Under `launch/slurm.sbatch` (with a
stand-in `srun` that sets what the real one sets) and under a TPU slice's worker variables, they
must form one jax runtime and train exactly as one process does. The JobSet that
`tools/launch.py` renders must pass a schema of the official API fields, and the environment
each of its pods gets must make `jaxlm.launch.detect` join the same runtime.
"""

import copy
import json
import os
import shlex
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from tests.helpers import REPO, one_sentence, train_losses

CONFIG = """
import ml_collections

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.name = "launch"
    c.data.manifest = {manifest!r}
    code = dict(paths={paths!r}, text_field="text", weight=1.0)
    c.data.datasets = ml_collections.ConfigDict(dict(code=code))
    c.data.streams = 2
    c.model.d_model = 32
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.n_kv_heads = 1
    c.model.head_dim = 16
    c.model.d_ff = 64
    c.model.max_seq_len = 32
    c.train.seq_len = 32
    c.train.batch_size = 8
    c.train.grad_accum = 1  # one row per device
    c.train.steps = 3
    c.train.log_every = 1
    c.optim.name = "adamw"  # the cheapest step to compile
    c.optim.warmup_steps = 1
    c.eval.batch_size = 256  # the final evaluation of all held-out text in a few batches
    c.eval.every = 0
    c.eval.next_line_examples = 0
    c.checkpoint.every = 100
    c.sample.max_tokens = 0
    c.logging.tensorboard = False
    c.mesh.shape = (1, -1, 1)
    return c
"""

# A stand-in for srun: starts SLURM_NTASKS copies of its command on this machine, each with the
# variables the real srun gives a task of a one-node step.
FAKE_SRUN = """#!{python}
import os, subprocess, sys

command = sys.argv[1:]
while command[0].startswith("-"):  # srun's own options
    command.pop(0)
tasks = int(os.environ["SLURM_NTASKS"])
step = {{"SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"], "SLURM_STEP_NUM_NODES": "1"}}
procs = [
    subprocess.Popen(command, env={{**os.environ, **step, "SLURM_PROCID": str(i),
                                   "SLURM_LOCALID": str(i)}})
    for i in range(tasks)
]
sys.exit(max(p.wait() for p in procs))
"""

LAUNCHER_VARIABLES = ("SLURM_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JAX_NUM", "JAX_PROCESS")


def environment(devices: int, **variables: str) -> dict:
    """This environment without any launcher's variables, `devices` CPU devices, `variables`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARIABLES)}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **variables)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


def free_port(low: int = 1024, high: int = 65535) -> int:
    """A port in [low, high] nobody listens on now."""
    for port in np.random.default_rng().permutation(np.arange(low, high + 1)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError:
                continue
            return int(port)
    raise RuntimeError(f"no free port in [{low}, {high}]")


@pytest.fixture(scope="module")
def config_file(stdlib_prepared, tmp_path_factory):
    path = tmp_path_factory.mktemp("launch") / "launch_config.py"
    manifest, data_cfg, *_ = stdlib_prepared
    path.write_text(CONFIG.format(manifest=manifest, paths=data_cfg.datasets.code.paths))
    return str(path)


@pytest.fixture(scope="module")
def one_process(config_file, tmp_path_factory):
    """The losses of the run in one process over 8 devices: what two processes must match."""
    workdir = str(tmp_path_factory.mktemp("one") / "run")
    command = [sys.executable, "-m", "jaxlm.main", f"--config={config_file}", "--workdir", workdir]
    proc = subprocess.run(command, cwd=REPO, env=environment(8), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "jax.distributed" not in proc.stdout  # alone: no runtime to join
    return train_losses(workdir)


def assert_one_run(stdout: str, source: str, workdir: str, one_process: dict) -> None:
    for i in range(2):
        assert f"jax.distributed: process {i} of 2 ({source}), 4 of 8 devices here" in stdout
    got = train_losses(workdir)
    assert sorted(got) == sorted(one_process) == [1, 2, 3]
    # Not bitwise: a cross-process all-reduce adds the 8 devices' gradients in another order.
    np.testing.assert_allclose([got[s] for s in got], [one_process[s] for s in got], rtol=1e-5)


@pytest.mark.slow
def test_slurm_batch_script_trains_two_tasks_as_one_run(config_file, one_process, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.format(python=sys.executable))
    srun.chmod(0o755)
    # jax's coordinator port is 61440 + job id % 4096: pick the job id of a free one.
    job_id = free_port(61440, 65535) - 61440 + 4096 * 7
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]])
    env = environment(
        4,
        PATH=path,
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NAME="jaxlm",
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="127.0.0.1",
    )
    workdir = str(tmp_path / "run")
    script = os.path.join(REPO, "launch", "slurm.sbatch")
    proc = subprocess.run(
        ["bash", script, config_file, workdir],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_one_run(proc.stdout, "slurm", workdir, one_process)


@pytest.mark.slow
def test_tpu_worker_variables_make_two_processes_one_run(config_file, one_process, tmp_path):
    """The variables GKE gives each worker of a multi-host TPU slice (TPU_WORKER_HOSTNAMES,
    TPU_WORKER_ID); no mesh flag."""
    workdir = str(tmp_path / "run")
    hosts = dict(TPU_WORKER_HOSTNAMES="127.0.0.1,127.0.0.1", JAX_COORDINATOR_PORT=str(free_port()))
    command = [sys.executable, "-m", "jaxlm.main", f"--config={config_file}", "--workdir", workdir]
    procs = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env=environment(4, TPU_WORKER_ID=str(i), **hosts),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert_one_run("".join(out for out, _ in results), "TPU environment", workdir, one_process)


# --------------------------------------------------------------------------- detection


def mesh(**fields) -> ml_collections.ConfigDict:
    base = dict(multihost=False, coordinator="", num_processes=1, process_id=0)
    return ml_collections.ConfigDict({**base, **fields})


def test_each_launcher_environment_gives_jax_its_process_count_and_id():
    from jaxlm import launch

    assert launch.detect(mesh(), {}) is None
    assert launch.detect(mesh(), {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert launch.detect(mesh(), {"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    explicit = launch.detect(mesh(coordinator="h:5", num_processes=3, process_id=2), {})
    assert explicit.initialize_kwargs == dict(
        coordinator_address="h:5",
        num_processes=3,
        process_id=2,
        cluster_detection_method="deactivate",
    )
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16"}
    slurm.update(SLURM_PROCID="3", SLURM_LOCALID="3")
    assert launch.detect(mesh(), slurm).initialize_kwargs == {"cluster_detection_method": "slurm"}
    # Multislice: 2 slices of 4 workers; worker 1 of slice 1 is process 5 of 8.
    tpu = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3", "TPU_WORKER_ID": "1"}
    tpu.update(MEGASCALE_NUM_SLICES="2", MEGASCALE_SLICE_ID="1")
    tpu.update(MEGASCALE_COORDINATOR_ADDRESS="s0-w0:1234")
    got = launch.detect(mesh(), tpu)
    assert got.source == "TPU environment"
    assert got.initialize_kwargs["coordinator_address"] == "s0-w0:8482"  # jax's port, not 1234
    assert (got.initialize_kwargs["num_processes"], got.initialize_kwargs["process_id"]) == (8, 5)
    assert launch.detect(mesh(multihost=True), {}).initialize_kwargs == {}
    # The explicit flags win over the environment, the environment over mesh.multihost.
    assert launch.detect(mesh(coordinator="h:5", num_processes=2), slurm).source == (
        "mesh.coordinator"
    )
    assert launch.detect(mesh(multihost=True), tpu).source == "TPU environment"


@pytest.mark.parametrize(
    "fields, environ, words",
    [
        ({}, {"SLURM_NTASKS": "8", "SLURM_JOB_ID": "1", "SLURM_PROCID": "0"}, "start every task"),
        ({}, {"JAX_NUM_PROCESSES": "2"}, "missing: JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID."),
        ({}, {"TPU_WORKER_HOSTNAMES": "a,b"}, "TPU_WORKER_ID is not set"),
        ({}, {"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "2"}, "TPU_WORKER_ID=2 must lie"),
        ({"coordinator": "10.0.0.2"}, {}, "must be host:port"),
        ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {}, "must lie in [0, "),
        ({"coordinator": "h:1", "num_processes": "two"}, {}, "'two' must be an integer"),
    ],
)
def test_a_misused_launcher_is_one_sentence(fields, environ, words):
    from jaxlm import launch
    from jaxlm.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        launch.detect(mesh(**fields), environ)
    assert words in one_sentence(e)


# --------------------------------------------------------------------------- Kubernetes


def pod_environment(manifest: dict, index: int) -> dict[str, str]:
    """What Kubernetes gives pod `index`'s container: the literal values, and the downward API's
    field references resolved the way the Job controller annotates an indexed pod."""
    from jaxlm import launch

    container = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    annotations = {launch.COMPLETION_INDEX: str(index)}
    env = {}
    for var in container["containers"][0]["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = annotations[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


@pytest.fixture(scope="module")
def validator():
    import jsonschema

    with open(os.path.join(REPO, "launch", "jobset.schema.json")) as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize(
    "target, hosts, selector, resource",
    [
        ("v5p-32", 4, {"tpu-accelerator": "tpu-v5p-slice", "tpu-topology": "2x2x4"}, "tpu"),
        ("v5e-16", 4, {"tpu-accelerator": "tpu-v5-lite-podslice", "tpu-topology": "4x4"}, "tpu"),
        ("h100-16", 2, {"accelerator": "nvidia-h100-80gb"}, "gpu"),
    ],
)
def test_jobset_passes_the_schema_and_its_pods_form_one_runtime(
    validator, target, hosts, selector, resource
):
    from jaxlm import hardware, launch

    command = ["python", "-m", "jaxlm.main", "--config=configs/llama_1b.py", "--workdir=/s/r"]
    manifest = launch.jobset(
        hardware.parse_target(target),
        name="llama_1b",
        image="img",
        command=command,
        claim="shared",
    )
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not errors, errors
    # The schema is closed: a misspelled field fails it.
    wrong = copy.deepcopy(manifest)
    wrong["spec"]["replicatedJobs"][0]["template"]["spec"]["paralellism"] = 2
    assert not validator.is_valid(wrong)

    (rjob,) = manifest["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] == hosts
    pod = job["template"]["spec"]
    labels = {f"cloud.google.com/gke-{k}": v for k, v in selector.items()}
    assert pod["nodeSelector"] == labels
    (container,) = pod["containers"]
    assert container["command"] == command
    limits = container["resources"]["limits"]
    assert limits == {"google.com/tpu": 4} if resource == "tpu" else {"nvidia.com/gpu": 8}
    assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]

    # Pod 0's stable name, as JobSet forms it: <jobset>-<replicated job>-<job>-<pod>.<subdomain>.
    network = manifest["spec"]["network"]
    assert network["enableDNSHostnames"]
    pod0 = f"{manifest['metadata']['name']}-{rjob['name']}-0-0.{network['subdomain']}"
    assert pod0 == "llama-1b-workers-0-0.llama-1b"
    ports = {p["containerPort"] for p in container["ports"]}
    for index in range(hosts):
        cluster = launch.detect(mesh(), pod_environment(manifest, index))
        kwargs = cluster.initialize_kwargs
        assert kwargs["coordinator_address"].rsplit(":", 1) == [pod0, str(min(ports))]
        assert (kwargs["num_processes"], kwargs["process_id"]) == (hosts, index)


def test_checked_in_manifests_are_what_the_tool_renders(validator):
    import yaml

    for kind in ("tpu", "gpu"):
        path = os.path.join(REPO, "launch", f"jobset-{kind}.yaml")
        with open(path) as f:
            text = f.read()
        (line,) = [x for x in text.splitlines() if x.startswith("#   python tools/launch.py")]
        argv = shlex.split(line.removeprefix("#   python "))
        out = subprocess.run(
            [sys.executable, *argv], cwd=REPO, env=environment(1), capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        body = "".join(x for x in text.splitlines(keepends=True) if not x.startswith("#"))
        assert out.stdout == body, f"{path} differs from `{line[4:]}`: regenerate it"
        assert validator.is_valid(yaml.safe_load(body))  # the YAML kubectl reads, too


@pytest.mark.parametrize(
    "target, overrides, words",
    [
        ("h100-12", {}, "GPU node pools have 8 GPUs a node"),
        ("v5p-32", {"data.streams": 3}, "data.streams=3 cannot be split over 4 processes"),
    ],
)
def test_a_run_that_cannot_fit_the_target_is_one_sentence(target, overrides, words):
    from configs import llama_1b
    from jaxlm import hardware, launch
    from jaxlm.errors import ConfigError

    config = llama_1b.get_config()
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    t = hardware.parse_target(target)
    with pytest.raises(ConfigError) as e:
        launch.check_streams(config, t, launch.node_pool(t))
    assert words in one_sentence(e)


def test_a_multi_host_workdir_must_be_on_the_shared_volume():
    from jaxlm import hardware, launch
    from jaxlm.errors import ConfigError

    pool = launch.node_pool(hardware.parse_target("h100-16"))
    launch.check_shared_workdir("/shared/runs/a", "pvc", "/shared", pool)
    launch.check_shared_workdir("/shared", "pvc", "/shared/", pool)
    launch.check_shared_workdir(
        "runs/a", "", "/shared", launch.node_pool(hardware.parse_target("h100-8"))
    )
    for workdir, claim in [("/shared/runs/a", ""), ("/sharedx/a", "pvc"), ("runs", "pvc")]:
        with pytest.raises(ConfigError) as e:
            launch.check_shared_workdir(workdir, claim, "/shared", pool)
        assert "pods' own disks" in one_sentence(e)


def test_the_tool_refuses_a_bad_run_in_one_line_before_printing_a_manifest():
    argv = ["tools/launch.py", "--config=configs/llama_1b.py", "--target=v5p-32", "--image=i"]
    argv += ["--workdir=/w", "--config.mesh.shape=(3,-1,1)"]
    out = subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=environment(1), capture_output=True, text=True
    )
    assert out.returncode == 1 and not out.stdout
    assert out.stderr.startswith("error: mesh.shape=(3, -1, 1) cannot be completed: 16 devices")
