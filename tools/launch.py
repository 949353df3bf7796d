"""Render the Kubernetes JobSet that trains a config on a GKE TPU slice or GPU node pool.

    python tools/launch.py --config=configs/llama_8b.py --target=v5p-64 \\
        --image=us-docker.pkg.dev/PROJECT/jaxlm/jaxlm:tpu --workdir=/shared/runs/llama_8b \\
        --claim=jaxlm-shared | kubectl apply -f -
    python tools/launch.py --config=configs/llama_8b.py --target=h100-16 --image=IMAGE \\
        --workdir=/shared/runs/llama_8b --claim=jaxlm-shared --config.train.steps=1000

One pod per host (TPU VM or 8-GPU node), one jax process per pod: pod i runs
`python -m jaxlm.main --config=... --workdir=...` (with the `--config.KEY=VALUE` overrides
given here) and finds the others through JAX_COORDINATOR_ADDRESS (pod 0's DNS name under the
JobSet's headless service), JAX_NUM_PROCESSES and JAX_PROCESS_ID (its job completion index).
The config is loaded here, so a bad key, a mesh that does not fit the target, data streams
that do not split over its hosts or a multi-host workdir outside the shared volume (`--claim`)
are one `error:` line before anything is submitted. Prints the
YAML (or writes `--out`); a summary goes to stderr. docs/launch.md has the whole recipe.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

# Config files do `from configs import base`; make the repository root importable from anywhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_TARGET = flags.DEFINE_string("target", None, "TPU slice or GPU count: v5p-64, v5e-16, h100-16.")
_IMAGE = flags.DEFINE_string("image", None, "Container image with jaxlm installed.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir, as every pod sees it.")
_NAME = flags.DEFINE_string("name", None, "JobSet name (default: the config's name).")
_CLAIM = flags.DEFINE_string("claim", "", "PersistentVolumeClaim every pod mounts (shared disk).")
_MOUNT = flags.DEFINE_string("mount_path", "/shared", "Where pods mount --claim.")
_OUT = flags.DEFINE_string("out", None, "Write the YAML here instead of printing it.")
for _flag in ("target", "image", "workdir"):
    flags.mark_flag_as_required(_flag)


def main(argv: list[str]) -> None:
    del argv
    from jaxlm import hardware, launch, sharding
    from jaxlm.errors import ConfigError

    config = _CONFIG.value
    target = hardware.parse_target(_TARGET.value)
    pool = launch.node_pool(target)
    sharding.resolve_mesh_shape(config.mesh.shape, target.chips)  # the mesh covers the slice
    launch.check_streams(config, target, pool)
    launch.check_shared_workdir(_WORKDIR.value, _CLAIM.value, _MOUNT.value, pool)
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"write {override} as {override}=VALUE: pods get it as one word.")
    command = [
        "python",
        "-m",
        "jaxlm.main",
        f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}",
        f"--workdir={_WORKDIR.value}",
        *overrides,
    ]
    manifest = launch.jobset(
        target,
        name=_NAME.value or config.name,
        image=_IMAGE.value,
        command=command,
        claim=_CLAIM.value,
        mount_path=_MOUNT.value,
    )
    text = launch.to_yaml(manifest)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    print(
        f"{manifest['metadata']['name']}: {pool.hosts} pods x {pool.chips_per_host} "
        f"{pool.resource} on {target.name}, one jax process each",
        file=sys.stderr,
    )


if __name__ == "__main__":
    from jaxlm.cli import run_cli

    run_cli(main)
