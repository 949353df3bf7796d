"""What a run reads before its first step: the prepared data, its tokenizer, the vocabulary.

`load` prepares (or finds) the data of a validated config, keeps the tokenizer (and a base
model's tokenizer files) in the workdir so every tool finds it there, and decides the model's
vocabulary size (a base model's embedding may be padded past its tokenizer).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax

from jaxlm import objectives, validate
from jaxlm.data import manifest as manifest_lib
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """The run's prepared data and tokenizer."""

    manifest: dict
    tokenizer: Any
    vocab_size: int  # the model's embedding rows


def load(config: Any, spec: Any, workdir: str) -> RunInputs:
    """The inputs of the run of `config` (validated into `spec`), its tokenizer kept in
    `workdir`. Every process calls it; data preparation splits its work over them."""
    # Imported here: data preparation is only needed by a full run, not by the step functions.
    from jaxlm.data import prepare as prepare_lib

    if config.data.manifest:  # validate.check has made sure it exists
        manifest_path = prepare_lib.local_manifest(config.data.manifest)
    else:
        manifest_path = prepare_lib.prepare(
            config.data,
            objectives.tokenizer_config(config),  # with the objective's special pieces
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    manifest = manifest_lib.load(manifest_path)  # refuses data whose tokenizer file was swapped
    validate.check_manifest(manifest, manifest_path, spec)
    tokenizer_path = manifest_lib.tokenizer_path(manifest)
    if jax.process_index() == 0:
        shutil.copyfile(tokenizer_path, os.path.join(workdir, os.path.basename(tokenizer_path)))
        if config.tokenizer.path:  # a base model's: its special tokens and chat template too
            from jaxlm.data import hf_tokenizer

            hf_tokenizer.keep_with_run(
                config.tokenizer.path, manifest["tokenizer"]["sha256"], workdir
            )
    tokenizer = tokenizer_lib.load(tokenizer_path)
    objectives.check_tokenizer(config, tokenizer)
    vocab_size = tokenizer.vocab_size
    if config.init_from:
        from jaxlm.convert import init_from

        # The base model's embedding may be padded past its tokenizer: keep the model's size.
        vocab_size = init_from.model_config(config.init_from).vocab_size
        if tokenizer.vocab_size > vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.vocab_size} pieces but init_from's model only "
                f"{vocab_size} embeddings; prepare the data with the base model's own tokenizer."
            )
    return RunInputs(manifest, tokenizer, vocab_size)
