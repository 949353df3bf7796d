"""How a run starts on many machines: the environment each launcher gives a process, and the
Kubernetes manifest that gives it.

`detect(mesh_cfg, environ)` reads which multi-process runtime this process belongs to, in this
order (the first that applies wins):

1. `mesh.coordinator` (with `mesh.num_processes`, `mesh.process_id`): explicit flags.
2. `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`: the Kubernetes manifests
   below set these (jax itself reads only the first).
3. Slurm, as `srun` sets it (`SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_NTASKS`,
   `SLURM_PROCID`, `SLURM_LOCALID`): jax's own Slurm detection fills everything in.
4. A TPU slice's worker variables (`TPU_WORKER_HOSTNAMES` or `TPU_PROCESS_ADDRESSES`,
   `TPU_WORKER_ID`, and `MEGASCALE_*` for multislice), as GKE sets them. jax reads the same
   variables, but only once it has found TPU chips, so a CPU could never exercise that path:
   jaxlm derives the same coordinator (`MEGASCALE_COORDINATOR_ADDRESS` or the first worker,
   port `JAX_COORDINATOR_PORT` or jax's 8482), process count (workers x slices) and process id
   (worker id + slice id x workers) itself.
5. `mesh.multihost=True`: `jax.distributed.initialize()` finds the rest, e.g. on a TPU VM
   started with `gcloud compute tpus tpu-vm ssh --worker=all`, where the worker number and
   peers come from the VM's metadata server rather than the environment.

`jobset(...)` renders a JobSet (jobset.x-k8s.io/v1alpha2) for a GKE TPU slice or GPU node pool:
one indexed Job whose pods are the processes, wired to jax.distributed through case 2: the
coordinator is pod 0's stable DNS name under the JobSet's headless service, the process id is
the pod's job completion index. docs/launch.md has the commands.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jaxlm import hardware
from jaxlm.errors import ConfigError

COORDINATOR_PORT = 8482  # jax's choice on TPU VMs; the manifests use it for GPUs too
REPLICATED_JOB = "workers"  # the JobSet's one replicated job: pods are <name>-workers-0-<i>
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"

# GKE's accelerator node labels for the chips of hardware.CHIPS.
_GKE_TPU_ACCELERATOR = {
    "tpu-v4": "tpu-v4-podslice",
    "tpu-v5e": "tpu-v5-lite-podslice",
    "tpu-v5p": "tpu-v5p-slice",
    "tpu-v6e": "tpu-v6e-slice",
}
_GKE_GPU_ACCELERATOR = {
    "a100": "nvidia-a100-80gb",
    "h100": "nvidia-h100-80gb",
    "h200": "nvidia-h200-141gb",
    "b200": "nvidia-b200",
}
GPUS_PER_NODE = 8
TPU_CHIPS_PER_HOST = 4  # every multi-host TPU slice; v5e/v6e single hosts also come with 8


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins the others: where `initialize_kwargs` came from, and them."""

    source: str  # "mesh.coordinator", "JAX_* environment", "slurm", "TPU environment", ...
    initialize_kwargs: dict[str, Any]  # for jax.distributed.initialize


def detect(mesh_cfg: Any, environ: Mapping[str, str]) -> Cluster | None:
    """The multi-process runtime this process belongs to, or None to run alone (see above).

    Raises ConfigError, in one sentence, for an environment that says "many processes" but
    leaves out what jax needs (a launcher misused), before any device or data work.
    """
    if mesh_cfg.get("coordinator"):
        return _explicit(
            "mesh.coordinator",
            mesh_cfg.coordinator,
            mesh_cfg.num_processes,
            mesh_cfg.process_id,
            names=("mesh.coordinator", "mesh.num_processes", "mesh.process_id"),
        )
    jax_env = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    if "JAX_NUM_PROCESSES" in environ or "JAX_PROCESS_ID" in environ:
        missing = [v for v in jax_env if not environ.get(v)]
        if missing:
            raise ConfigError(
                f"{', '.join(jax_env)} must be set together; missing: {', '.join(missing)}."
            )
        return _explicit("JAX_* environment", *(environ[v] for v in jax_env), names=jax_env)
    slurm = _slurm(environ)
    if slurm is not None:
        return slurm
    tpu = _tpu(environ)
    if tpu is not None:
        return tpu
    if mesh_cfg.get("multihost"):
        return Cluster("jax's cluster detection", {})
    return None


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} must be an integer.") from None


def _explicit(
    source: str, coordinator: str, num_processes: Any, process_id: Any, names: Sequence[str]
) -> Cluster:
    """Every value given: jax's cluster detection is off (it would pick one GPU per process)."""
    if not re.fullmatch(r".+:\d+", str(coordinator)):
        raise ConfigError(f"{names[0]}={coordinator!r} must be host:port, e.g. 10.0.0.2:8482.")
    count, index = _int(num_processes, names[1]), _int(process_id, names[2])
    if not 0 <= index < count:
        raise ConfigError(
            f"{names[2]}={index} must lie in [0, {names[1]}={count}): one id per process."
        )
    kwargs = dict(coordinator_address=str(coordinator), num_processes=count, process_id=index)
    return Cluster(source, {**kwargs, "cluster_detection_method": "deactivate"})


# What jax's SlurmCluster requires besides SLURM_NTASKS; srun sets them for each task of a step.
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")


def _slurm(environ: Mapping[str, str]) -> Cluster | None:
    if "SLURM_NTASKS" not in environ or _int(environ["SLURM_NTASKS"], "SLURM_NTASKS") < 2:
        return None
    missing = [v for v in _SLURM_STEP if v not in environ]
    if missing:
        raise ConfigError(
            f"SLURM_NTASKS={environ['SLURM_NTASKS']} but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: start every task with srun (as "
            "launch/slurm.sbatch does), or unset SLURM_NTASKS to run a single process."
        )
    # jax derives the coordinator (first node of the step, port 61440 + job id % 4096, or
    # JAX_COORDINATOR_PORT) and gives each task the GPU numbered SLURM_LOCALID.
    return Cluster("slurm", {"cluster_detection_method": "slurm"})


def _tpu(environ: Mapping[str, str]) -> Cluster | None:
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
    if not hosts:
        return None
    workers = hosts.split(",")
    slices = _int(environ.get("MEGASCALE_NUM_SLICES") or 1, "MEGASCALE_NUM_SLICES")
    if len(workers) * slices < 2:
        return None
    if not environ.get("TPU_WORKER_ID"):
        raise ConfigError(
            f"TPU_WORKER_HOSTNAMES lists {len(workers)} workers but TPU_WORKER_ID is not set: "
            "each worker needs its own index."
        )
    worker = _int(environ["TPU_WORKER_ID"], "TPU_WORKER_ID")
    if not 0 <= worker < len(workers):
        raise ConfigError(f"TPU_WORKER_ID={worker} must lie in [0, {len(workers)}).")
    slice_id = _int(environ.get("MEGASCALE_SLICE_ID") or 0, "MEGASCALE_SLICE_ID")
    host = (environ.get("MEGASCALE_COORDINATOR_ADDRESS") or workers[0]).split(":")[0]
    port = environ.get("JAX_COORDINATOR_PORT") or COORDINATOR_PORT
    return _explicit(
        "TPU environment",
        f"{host}:{port}",
        len(workers) * slices,
        worker + slice_id * len(workers),
        names=("TPU coordinator", "TPU process count", "TPU process id"),
    )


# --------------------------------------------------------------------------- Kubernetes


@dataclasses.dataclass(frozen=True)
class NodePool:
    """The GKE machines a target runs on: one pod (one jax process) per machine."""

    hosts: int
    chips_per_host: int
    node_selector: dict[str, str]
    resource: str  # the extended resource a pod requests: google.com/tpu or nvidia.com/gpu


def node_pool(target: hardware.Target) -> NodePool:
    """GKE node selector, hosts and chips per host for a target such as v5p-64 or h100-16."""
    chip = next(k for k, c in hardware.CHIPS.items() if c is target.chip)
    if target.platform == "tpu":
        single_host = target.chips <= (8 if target.chip.topology_dims == 2 else 4)
        per_host = target.chips if single_host else TPU_CHIPS_PER_HOST
        topology = "x".join(map(str, hardware.torus_shape(target.chips, target.chip)))
        selector = {
            "cloud.google.com/gke-tpu-accelerator": _GKE_TPU_ACCELERATOR[chip],
            "cloud.google.com/gke-tpu-topology": topology,
        }
        return NodePool(target.chips // per_host, per_host, selector, "google.com/tpu")
    if target.chips > GPUS_PER_NODE and target.chips % GPUS_PER_NODE:
        raise ConfigError(
            f"--target={target.name}: GPU node pools have {GPUS_PER_NODE} GPUs a node; "
            f"ask for a multiple of {GPUS_PER_NODE} or at most {GPUS_PER_NODE}."
        )
    per_host = min(target.chips, GPUS_PER_NODE)
    selector = {"cloud.google.com/gke-accelerator": _GKE_GPU_ACCELERATOR[chip]}
    return NodePool(target.chips // per_host, per_host, selector, "nvidia.com/gpu")


def check_streams(config: Any, target: hardware.Target, pool: NodePool) -> None:
    """Refuses, before anything is submitted, data streams the target's processes cannot share."""
    streams = int(config.data.streams)
    if streams and streams % pool.hosts:
        raise ConfigError(
            f"data.streams={streams} cannot be split over {pool.hosts} processes (one per "
            f"host of {target.name}); use a multiple of {pool.hosts}, or 0 for one each."
        )


def check_shared_workdir(workdir: str, claim: str, mount_path: str, pool: NodePool) -> None:
    """Refuses a multi-host workdir on each pod's own disk: the processes write one checkpoint."""
    if pool.hosts == 1 or "://" in workdir:  # one pod, or a bucket every pod reads
        return
    mount, path = os.path.normpath(mount_path), os.path.normpath(workdir)
    if not claim or not os.path.isabs(path) or os.path.commonpath([mount, path]) != mount:
        raise ConfigError(
            f"--workdir={workdir} would be on each of the {pool.hosts} pods' own disks: give "
            f"--claim=PVC (mounted at --mount_path={mount_path}) and a workdir under it."
        )


def _dns_label(name: str) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not label or not label[0].isalpha():
        raise ConfigError(f"--name={name!r} must start with a letter (a Kubernetes name).")
    # Pod host names are <name>-workers-<job>-<pod>: keep them under DNS's 63 characters.
    limit = 63 - len(f"-{REPLICATED_JOB}-0-") - len(str(10**4))
    if len(label) > limit:
        raise ConfigError(f"--name={name!r} is too long for a JobSet; keep it to {limit}.")
    return label


def coordinator_host(name: str) -> str:
    """Pod 0's stable DNS name: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>
    (JobSet's `network.enableDNSHostnames`; the subdomain is the JobSet's name here)."""
    return f"{name}-{REPLICATED_JOB}-0-0.{name}"


def jobset(
    target: hardware.Target,
    *,
    name: str,
    image: str,
    command: Sequence[str],
    claim: str = "",
    mount_path: str = "/shared",
) -> dict[str, Any]:
    """A JobSet running `command` in one pod per host of `target` on a GKE node pool.

    Args:
      target: the slice or GPU count (hardware.parse_target), e.g. v5p-64 or h100-16.
      name: the JobSet's name (a DNS label); it names the pods and the headless service.
      image: a container image with jaxlm installed (docs/launch.md builds one).
      command: what each pod runs, e.g. python -m jaxlm.main --config=... --workdir=...
      claim: a PersistentVolumeClaim every pod mounts at `mount_path` (ReadWriteMany: a
        Filestore or GCS FUSE volume), for the workdir and the prepared data; '' = none.
    Returns:
      The manifest as plain data (`to_yaml` writes it for kubectl).
    """
    name = _dns_label(name)
    pool = node_pool(target)
    env = [
        {
            "name": "JAX_COORDINATOR_ADDRESS",
            "value": f"{coordinator_host(name)}:{COORDINATOR_PORT}",
        },
        {"name": "JAX_NUM_PROCESSES", "value": str(pool.hosts)},
        {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
    ]
    container: dict[str, Any] = {
        "name": "jaxlm",
        "image": image,
        "command": list(command),
        "env": env,
        "ports": [{"containerPort": COORDINATOR_PORT, "name": "coordinator"}],
        "resources": {"limits": {pool.resource: pool.chips_per_host}},
    }
    volumes = []
    if target.platform == "gpu":  # NCCL's buffers live in /dev/shm, 64 MiB by default in a pod
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if claim:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": claim}})
        mount = {"name": "shared", "mountPath": mount_path}
        container["volumeMounts"] = [*container.get("volumeMounts", []), mount]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # a failed process fails the Job; JobSet restarts them all
        "nodeSelector": pool.node_selector,
        "containers": [container],
    }
    if volumes:
        pod_spec["volumes"] = volumes
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "jaxlm"}}
    if target.platform == "tpu":  # all pods of the slice on one node pool (one ICI domain)
        exclusive = "alpha.jobset.sigs.k8s.io/exclusive-topology"
        metadata["annotations"] = {exclusive: "cloud.google.com/gke-nodepool"}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            # A restart recreates every pod; jaxlm.main resumes from the newest checkpoint.
            "failurePolicy": {"maxRestarts": 3},
            "network": {"enableDNSHostnames": True, "subdomain": name},
            "replicatedJobs": [
                {
                    "name": REPLICATED_JOB,
                    "replicas": 1,
                    "template": {
                        "spec": {
                            "parallelism": pool.hosts,
                            "completions": pool.hosts,
                            "completionMode": "Indexed",  # JOB_COMPLETION_INDEX = process id
                            "backoffLimit": 0,
                            "template": {"spec": pod_spec},
                        }
                    },
                }
            ],
        },
    }


def to_yaml(manifest: Mapping[str, Any]) -> str:
    """The manifest as YAML, keys in the order Kubernetes documents them."""
    import yaml  # PyYAML: a requirement of flax

    return yaml.safe_dump(manifest, sort_keys=False, width=100)
