"""The run spec: everything a run builds from its config, built once, by validation.

`build(config)` is the one place a run's ModelConfig and stage plan are made from the config
(`validate.check_config` calls it and returns the spec); `train.Setup`, the loop, `aot`,
`estimate`, the data stream and the tools take the spec, so a value is derived once and every
consumer sees the same one. What the spec does not own (checkpoint, logging, sample and data
source settings) is read from `spec.config` by the module that owns that section.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

from jaxlm import model as model_lib
from jaxlm import optim, sharding, stages
from jaxlm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A run's config, checked, and what was built from it."""

    config: Any  # the checked ConfigDict (saved with checkpoints; sections the spec does not own)
    model: model_lib.ModelConfig  # vocab from tokenizer.vocab_size; attention may still be 'auto'
    plan: stages.Plan
    preset: str  # mesh.preset: the logical-axis rules (`sharding.rules_for`)
    objective: str  # config.objective
    seed: int
    eval_batch_size: int  # global rows per held-out batch (eval.batch_size, else train's)
    spike_ratio: float
    spike_warmup: int
    loss_chunk: int  # train.loss_chunk: vocabulary tile of the tiled cross-entropy; 0 = off
    z_loss: float = 0.0  # train.z_loss: coefficient of the log-normaliser penalty; 0 = off
    mtp_weight: float = 0.0  # train.mtp_weight: the multi-token heads' loss weight

    @property
    def eval_seq_len(self) -> int:
        """Held-out evaluation runs at the plan's longest length, the whole run long."""
        return self.plan.max_seq_len

    def model_for(
        self, vocab_size: int | None = None, platform: str | None = None
    ) -> model_lib.ModelConfig:
        """The model of the run on `platform` (default: this host's backend), with the data's
        `vocab_size`: `attention='auto'` resolved for the platform (a target's when compiling
        for hardware this host does not have)."""
        m = self.model
        if vocab_size is not None:
            m = dataclasses.replace(m, vocab_size=vocab_size)
        return m.for_platform(platform)

    def optimizer(self) -> optax.GradientTransformation:
        """The run's optimizer on the plan's schedule (`Plan.schedule`)."""
        return optim.make_optimizer(self.config.optim, self.plan.schedule)


def build(config: Any) -> RunSpec:
    """The spec of `config`: the model config, the stage plan and the optimizer, each built
    once; their problems are one-sentence ConfigErrors naming the key."""
    try:
        model = model_lib.ModelConfig.from_config(config.model, config.tokenizer.vocab_size)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model cannot build a model: {e}") from None
    sharding.rules_for(config.mesh.preset)
    plan = stages.build(config)
    spec = RunSpec(
        config=config,
        model=model,
        plan=plan,
        preset=config.mesh.preset,
        objective=config.get("objective", "causal"),
        seed=int(config.seed),
        eval_batch_size=int(config.eval.batch_size or config.train.batch_size),
        spike_ratio=float(config.train.spike_ratio),
        spike_warmup=int(config.train.spike_warmup),
        loss_chunk=int(config.train.get("loss_chunk", 0)),
        z_loss=float(config.train.get("z_loss", 0.0)),
        mtp_weight=float(config.train.get("mtp_weight", 0.0)),
    )
    if model.mtp_heads and (spec.objective != "causal" or not spec.mtp_weight):
        raise ConfigError(
            f"model.mtp_heads={model.mtp_heads} trains only with objective=causal and "
            f"train.mtp_weight > 0 (here {spec.objective}, {spec.mtp_weight})."
        )
    if spec.loss_chunk and model.final_softcap:
        raise ConfigError(
            "train.loss_chunk (the tiled cross-entropy) has no logit soft-cap; set "
            "train.loss_chunk=0 with model.final_softcap."
        )
    if model.tie_embeddings and optim.HEAD in optim.group_scales(config.optim):
        raise ConfigError(
            "optim.groups.head sets the untied output head's group; the model has none "
            "(model.tie_embeddings=True)."
        )
    try:
        spec.optimizer()
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.optim cannot build an optimizer: {e}") from None
    return spec
