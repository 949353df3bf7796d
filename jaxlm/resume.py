"""Where a run starts: its own newest checkpoint (in the local or the persistent tier, see
jaxlm/tiers.py), another run's checkpoint it branches from, base-model weights
(`config.init_from`), or a fresh initialisation.

`start` decides and returns the state with the data position saved beside it; the loop gives
that position to its stream.
"""

from __future__ import annotations

from typing import Any

from jaxlm import checkpoint as ckpt_lib
from jaxlm import tiers, train
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import ConfigError

# Muon's settings that change its optimizer state's structure, with their value in configs
# saved before the setting existed: a checkpoint restores only under the values it was written
# with (and under the same optim.name).
_MUON_STATE_SHAPING = {"optim.muon.variant": "newton_schulz", "optim.muon.ns_loop": False}


def start(
    checkpointer: ckpt_lib.Checkpointer,
    setup: train.Setup,
    tokenizer_sha256: str,
    out: Any,
    local: tiers.LocalTier | None = None,
) -> tuple[int, train.TrainState, dict | None]:
    """(step, state, saved data position or None) the run of `setup` starts from.

    `checkpointer` holds the run's own persistent checkpoints and `local` this host's local
    tier (if on): the newest step every host can restore is resumed (`tiers.agree`, a
    collective). Without any checkpoint, a `config.branch` run continues init_from's
    checkpoint, else the state is fresh (with init_from's weights, if any). `out`
    (`metrics.Writer`) logs, and forgets the metrics past a resumed step.
    """
    config = setup.config
    if local is not None:
        choice = tiers.agree(local, setup.abstract_state, checkpointer.steps())
        if tiers.describe(choice):
            out.print(tiers.describe(choice))
        if choice.tier == "local":
            # (its layout, shapes and dtypes included, matched `setup.abstract_state`'s)
            state, data_state, saved_meta = local.restore(choice.step, setup.abstract_state)
            return _resumed(
                choice.step,
                state,
                data_state,
                saved_meta,
                tokenizer_sha256,
                out,
                f"the local tier {local.directory}",
            )
    if not checkpointer.steps() and config.branch:
        return _branch(setup, tokenizer_sha256, out)
    if not checkpointer.steps():
        state = setup.init_state()
        if config.init_from:
            from jaxlm.convert import init_from

            state["params"] = init_from.load_params(
                config.init_from, setup, tokenizer_sha256, log=out.print
            )
        return 0, state, None
    if checkpointer.read_meta(checkpointer.steps()[-1]).get("params_only"):
        raise ConfigError(
            f"{checkpointer.directory} holds imported weights, not a training run; train in "
            "a new --workdir with --config.init_from=ckpt:<this workdir>."
        )
    saved_config = checkpointer.read_meta(checkpointer.steps()[-1]).get("config")
    check_optimizer_state(config.to_dict(), saved_config, checkpointer.directory)
    step, state, data_state, saved_meta = checkpointer.restore(setup.abstract_state)
    return _resumed(
        step, state, data_state, saved_meta, tokenizer_sha256, out, checkpointer.directory
    )


def check_optimizer_state(config: dict, saved: dict | None, where: str) -> None:
    """Raises ConfigError if `config` shapes the optimizer state differently from `saved`, the
    config of the checkpoint in `where` (orbax could not restore it, and the restore would take
    a sound checkpoint for an unreadable one)."""
    if not saved:
        return

    def value(cfg: dict, key: str, default: Any) -> Any:
        for part in key.split("."):
            if not isinstance(cfg, dict) or part not in cfg:
                return default
            cfg = cfg[part]
        return cfg

    keys = {"optim.name": None}
    if value(config, "optim.name", None) == "muon":  # they shape nothing in another optimizer
        keys |= _MUON_STATE_SHAPING
    for key, default in keys.items():
        now, then = value(config, key, default), value(saved, key, default)
        if now != then:
            raise ConfigError(
                f"{key}={now!r} shapes the optimizer state differently from the checkpoint in "
                f"{where} ({then!r}); pass --config.{key}={then!r} to resume it, or another "
                "--workdir."
            )


def _resumed(
    step: int,
    state: train.TrainState,
    data_state: dict | None,
    saved_meta: dict,
    tokenizer_sha256: str,
    out: Any,
    where: str,
) -> tuple[int, train.TrainState, dict | None]:
    """A restored checkpoint, once its tokenizer is known to be the data's."""
    tokenizer_lib.check_same(
        tokenizer_sha256,
        saved_meta.get("tokenizer_sha256"),
        "the data",
        f"the checkpoint at step {step} was trained with",
        "use the original data and tokenizer config",
    )
    out.trim(step)
    out.print(f"resuming from checkpoint at step {step} in {where}")
    return step, state, data_state


def _branch(
    setup: train.Setup, tokenizer_sha256: str, out: Any
) -> tuple[int, train.TrainState, dict | None]:
    """config.branch: the whole state of init_from's checkpoint (parameters, optimizer state,
    step, data position), continued under this run's plan: a cool-down branched from a
    stable-phase checkpoint trains exactly as if the decay had been planned from the start."""
    from jaxlm.convert import init_from

    config = setup.config
    ckpt_dir, step = ckpt_lib.resolve(init_from.parse(config.init_from)[1])
    source = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
    try:
        step, state, data_state, meta = source.restore(setup.abstract_state, step)
    finally:
        source.close()
    tokenizer_lib.check_same(
        tokenizer_sha256,
        meta.get("tokenizer_sha256"),
        "this run's data",
        f"config.init_from={config.init_from!r} was trained with",
        "branch with the data it was trained on",
    )
    if step > setup.plan.total_steps:
        raise ConfigError(
            f"config.init_from's checkpoint is at step {step}, past this run's last step "
            f"({setup.plan.total_steps}); branch from an earlier checkpoint or add stages."
        )
    out.print(f"branching from step {step} of {ckpt_dir} (state, optimizer, data)")
    return step, state, data_state
