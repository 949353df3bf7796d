"""Training: state set-up, the pure train/eval steps, and the loop with eval, checkpoints, resume.

`run(config, workdir)` is the whole job: prepare (or find) the data, build the sharded state or
restore it from the newest checkpoint in `workdir`, train, evaluate, save, and print a sample.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlm import checkpoint as ckpt_lib
from jaxlm import generate as generate_lib
from jaxlm import metrics as metrics_lib
from jaxlm import model as model_lib
from jaxlm import optim, sharding
from jaxlm.data import pipeline
from jaxlm.errors import ConfigError

TrainState = dict[str, Any]  # {'params', 'opt_state', 'step', 'rng'}
Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions (B, L) int32; loss_mask f32


def validate(config: Any) -> None:
    """Checks cross-field constraints once, before any expensive work."""
    t = config.train
    if t.steps <= 0 or t.batch_size <= 0 or t.seq_len <= 0:
        raise ConfigError("train.steps, train.batch_size and train.seq_len must be positive.")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum={t.grad_accum}."
        )
    if t.seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={config.model.max_seq_len}."
        )
    if config.optim.warmup_steps < 0 or config.optim.lr < 0:
        raise ConfigError("optim.lr and optim.warmup_steps must not be negative.")


# --------------------------------------------------------------------------- the pure steps


def loss_sums(graphdef: Any, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy (fp32) and the number of target tokens in `batch`."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])  # (B, L, V) fp32
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # (B, L)
    mask = batch["loss_mask"]
    return jnp.sum(nll * mask), jnp.sum(mask)


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Builds `train_step(state, batch) -> (state, metrics)`: one optimizer update.

    With `grad_accum > 1` the batch is split into micro-batches whose summed gradients are
    normalised by the total target count, so the update equals the one of the whole batch.
    """
    grad_fn = jax.value_and_grad(lambda p, b: loss_sums(graphdef, p, b), has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        params = state["params"]
        if grad_accum == 1:
            (loss_sum, count), grads = grad_fn(params, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

            def accumulate(carry, micro_batch):
                (loss_sum, count), grads = grad_fn(params, micro_batch)
                acc_loss, acc_count, acc_grads = carry
                return (acc_loss + loss_sum, acc_count + count, jax.tree.map(jnp.add, acc_grads, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss_sum, count, grads), _ = jax.lax.scan(accumulate, (0.0, 0.0, zeros), micro)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss_sum / count,
            "grad_norm": optim.global_norm(grads),
            "update_norm": optim.global_norm(updates),
            "param_norm": optim.global_norm(new_params),
            "lr": schedule(state["step"]),
            "tokens": count,
        }
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: Any) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """Builds `eval_step(params, batch) -> (summed nll, target count)`."""
    return lambda params, batch: loss_sums(graphdef, params, batch)


# --------------------------------------------------------------------------- state set-up


class Setup:
    """The model, optimizer and shardings of a run, built once from its config."""

    def __init__(self, config: Any, vocab_size: int, mesh: jax.sharding.Mesh):
        self.config = config
        self.model_cfg = model_lib.ModelConfig.from_config(config.model, vocab_size)
        self.mesh = mesh
        self.rules = sharding.rules_for(config.mesh.preset)
        self.tx, self.schedule = optim.make_optimizer(config.optim, config.train.steps)
        abstract_model = model_lib.abstract(self.model_cfg)
        self.graphdef, abstract_params_state = nnx.split(abstract_model)
        axes = model_lib.logical_axes(abstract_params_state)
        abstract_params = nnx.to_pure_dict(abstract_params_state)
        self.param_shardings = sharding.tree_shardings(mesh, axes, abstract_params, self.rules)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
            transform_non_params=lambda _: replicated,
        )
        self.state_shardings = {
            "params": self.param_shardings,
            "opt_state": opt_shardings,
            "step": replicated,
            "rng": replicated,
        }
        abstract_state = jax.eval_shape(self._init_fn)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, self.state_shardings
        )
        self.n_params = model_lib.count_params(abstract_params)

    def _init_fn(self) -> TrainState:
        seed = self.config.seed
        with nnx.use_eager_sharding(False):
            model = model_lib.Transformer(self.model_cfg, nnx.Rngs(params=seed))
        params = nnx.to_pure_dict(nnx.state(model))
        return {
            "params": params,
            "opt_state": self.tx.init(params),
            "step": jnp.array(0, jnp.int32),
            "rng": jax.random.PRNGKey(seed),
        }

    def init_state(self) -> TrainState:
        """Fresh state, created directly in its shards (no full copy on one device)."""
        with sharding.use(self.mesh, self.rules):
            return jax.jit(self._init_fn, out_shardings=self.state_shardings)()

    def jit_train_step(self) -> Callable:
        step = make_train_step(self.graphdef, self.tx, self.schedule, self.config.train.grad_accum)
        batch_sh = sharding.batch_sharding(self.mesh)
        return jax.jit(step, in_shardings=(self.state_shardings, batch_sh),
                       out_shardings=(self.state_shardings, None), donate_argnums=0)

    def jit_eval_step(self) -> Callable:
        batch_sh = sharding.batch_sharding(self.mesh)
        return jax.jit(make_eval_step(self.graphdef), in_shardings=(self.param_shardings, batch_sh))

    def flops_per_token(self, seq_len: int) -> float:
        m = self.model_cfg
        non_embed = self.n_params - m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
        return metrics_lib.flops_per_token(non_embed, m.n_layers, m.n_heads, m.head_dim, seq_len,
                                           m.vocab_size, m.d_model)


# --------------------------------------------------------------------------- evaluation


def evaluate(setup: Setup, eval_step: Callable, params: Any, manifest: dict) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte for each dataset and for all together."""
    cfg = setup.config
    batch_size = cfg.eval.batch_size or cfg.train.batch_size
    host_rows = batch_size // jax.process_count()
    out, total_nll, total_bytes, total_count = {}, 0.0, 0.0, 0.0
    for name in sorted(manifest["datasets"]):
        if manifest["datasets"][name]["val"]["documents"] == 0:
            continue
        n = pipeline.eval_num_batches(manifest, name, cfg.train.seq_len, batch_size, cfg.eval.max_batches)
        nll, count = 0.0, 0.0
        with sharding.use(setup.mesh, setup.rules):
            for host_batch in pipeline.eval_batches(
                manifest, name, seq_len=cfg.train.seq_len, batch_size=host_rows, num_batches=n,
                process_index=jax.process_index(), process_count=jax.process_count(),
            ):
                s, c = eval_step(params, sharding.host_to_global(host_batch, setup.mesh))
                nll, count = nll + float(s), count + float(c)
        loss = nll / max(count, 1)
        nbytes = count * pipeline.val_bytes_per_target(manifest, name)
        out[f"{name}/loss"] = loss
        out[f"{name}/perplexity"] = math.exp(min(loss, 50))
        out[f"{name}/bits_per_byte"] = nll / math.log(2) / max(nbytes, 1)
        total_nll, total_bytes, total_count = total_nll + nll, total_bytes + nbytes, total_count + count
    if total_count:
        out["loss"] = total_nll / total_count
        out["perplexity"] = math.exp(min(out["loss"], 50))
        out["bits_per_byte"] = total_nll / math.log(2) / total_bytes
    return out


# --------------------------------------------------------------------------- the job


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the training job described by `config` in `workdir`.

    Returns a summary: final train loss, final eval metrics, gzip baseline, steps run.
    """
    # Imported here: data preparation is only needed by a full run, not by the step functions.
    from jaxlm.data import prepare as prepare_lib
    from jaxlm.data.tokenizer import Tokenizer

    validate(config)
    sharding.maybe_initialize_distributed(config.mesh)
    mesh = sharding.make_mesh(config.mesh.shape)
    if config.train.batch_size % (sharding.batch_divisor(mesh) * config.train.grad_accum):
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} must divide by the batch mesh axes "
            f"({sharding.batch_divisor(mesh)}) times train.grad_accum ({config.train.grad_accum})."
        )
    _prepare_workdir(workdir, config)
    out = metrics_lib.Writer(workdir, config.logging, config.to_dict())

    manifest_path = prepare_lib.prepare(
        config.data, config.tokenizer, process_index=jax.process_index(), process_count=jax.process_count()
    )
    manifest = pipeline.load_manifest(manifest_path)
    tokenizer = Tokenizer.load(os.path.join(manifest["root"], manifest["tokenizer"]["file"]))
    setup = Setup(config, tokenizer.vocab_size, mesh)
    out.print(
        f"model: {setup.n_params / 1e6:.2f}M parameters | mesh {dict(mesh.shape)} preset "
        f"{config.mesh.preset} | {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es)"
    )

    checkpointer = ckpt_lib.Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"), config.checkpoint)
    host_batch = config.train.batch_size // jax.process_count()
    train_data = pipeline.train_dataset(
        manifest, seq_len=config.train.seq_len, batch_size=host_batch, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        weights={n: d.weight for n, d in config.data.datasets.items()},
        worker_count=config.data.grain_workers,
    )
    train_iter = iter(train_data)
    meta = {
        "config": json.loads(config.to_json_best_effort()),
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        "mesh_shape": dict(mesh.shape),
        "param_shapes": ckpt_lib.param_shapes(setup.abstract_state["params"]),
    }
    if checkpointer.steps():
        step0, state, data_state, saved_meta = checkpointer.restore(setup.abstract_state)
        if saved_meta.get("tokenizer_sha256") != meta["tokenizer_sha256"]:
            raise ckpt_lib.CheckpointError(
                f"the checkpoint at step {step0} was trained with tokenizer "
                f"{saved_meta.get('tokenizer_sha256', '?')[:12]} but the data now uses "
                f"{meta['tokenizer_sha256'][:12]}; use the original data/tokenizer config."
            )
        if data_state is not None:
            train_iter.set_state(data_state)
        out.print(f"resuming from checkpoint at step {step0} in {checkpointer.directory}")
    else:
        state = setup.init_state()
        step0 = 0

    train_step = setup.jit_train_step()
    eval_step = setup.jit_eval_step()
    summary = _loop(config, setup, state, step0, train_step, eval_step, train_iter, manifest,
                    checkpointer, meta, out)
    checkpointer.close()

    _print_sample(config, setup, summary.pop("params"), tokenizer, out)
    out.close()
    return summary


def _loop(config, setup, state, step0, train_step, eval_step, train_iter, manifest, checkpointer, meta, out):
    total = config.train.steps
    tokens_per_step = config.train.batch_size * config.train.seq_len
    flops_per_step = setup.flops_per_token(config.train.seq_len) * tokens_per_step
    peak = metrics_lib.peak_flops_per_device()
    clock = metrics_lib.Throughput(step0, total, tokens_per_step)
    pending, data_wait, last = [], 0.0, {}
    summary: dict[str, Any] = {"start_step": step0}
    start = time.perf_counter()

    with sharding.use(setup.mesh, setup.rules):
        for step in range(step0, total):
            t0 = time.perf_counter()
            host_batch = next(train_iter)
            data_wait += time.perf_counter() - t0
            state, step_metrics = train_step(state, sharding.host_to_global(host_batch, setup.mesh))
            pending.append(step_metrics)
            done = step + 1

            if done % config.train.log_every == 0 or done == total:
                fetched = jax.device_get(pending)
                last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                last["lr"] = float(fetched[-1]["lr"])
                timing = clock.update(done)
                last.update(timing, data_wait_s=data_wait / len(fetched))
                last["update_to_param"] = last["update_norm"] / max(last["param_norm"], 1e-12)
                if peak:
                    last["mfu"] = flops_per_step / timing["step_time_s"] / (peak * jax.device_count())
                mem = metrics_lib.device_memory_gb()
                if mem is not None:
                    last["memory_gb"] = mem
                pending, data_wait = [], 0.0
                out.write(done, {k: v for k, v in last.items() if k != "eta_s"}, prefix="train/")
                mfu = f" mfu {last['mfu']:.1%}" if "mfu" in last else ""
                out.print(
                    f"step {done:>6}/{total} | loss {last['loss']:.4f} | lr {last['lr']:.2e} | "
                    f"grad {last['grad_norm']:.3f} | {last['tokens_per_s']:,.0f} tok/s{mfu} | "
                    f"ETA {metrics_lib.format_duration(timing['eta_s'])}"
                )

            if config.eval.every and done % config.eval.every == 0 and done != total:
                _eval_and_log(setup, eval_step, state["params"], manifest, done, out)

            if done % config.checkpoint.every == 0 or done == total:
                checkpointer.save(done, state, pipeline.iterator_state(train_iter), meta, force=done == total)

        final_eval = _eval_and_log(setup, eval_step, state["params"], manifest, total, out)

    gzip_bpb = manifest.get("val_gzip_bits_per_byte", {}).get("all")
    summary.update(
        final_step=total, train_loss=last.get("loss"), eval=final_eval, gzip_bits_per_byte=gzip_bpb,
        wall_s=time.perf_counter() - start, params=state["params"],
    )
    if "bits_per_byte" in final_eval:
        gz = f" | gzip -9 on the same text: {gzip_bpb:.3f} bits/byte" if gzip_bpb else ""
        out.print(f"final held-out: {final_eval['bits_per_byte']:.3f} bits/byte (loss "
                  f"{final_eval['loss']:.4f}){gz}")
    return summary


def _eval_and_log(setup, eval_step, params, manifest, step, out) -> dict[str, float]:
    t0 = time.perf_counter()
    result = evaluate(setup, eval_step, params, manifest)
    out.write(step, result, prefix="eval/")
    if "loss" in result:
        out.print(f"eval  {step:>6} | loss {result['loss']:.4f} | ppl {result['perplexity']:.2f} | "
                  f"{result['bits_per_byte']:.3f} bits/byte | {time.perf_counter() - t0:.1f}s")
    return result


def _print_sample(config, setup, params, tokenizer, out) -> None:
    s = config.sample
    if s.max_tokens <= 0 or not s.prompt:
        return
    with sharding.use(setup.mesh, setup.rules):
        new_tokens = generate_lib.generate(
            setup.graphdef, params, [tokenizer.encode(s.prompt)], max_new_tokens=s.max_tokens,
            eos_id=tokenizer.eos_id, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=config.seed,
        )[0]
    out.print("sample (KV-cache decoding):\n" + s.prompt + tokenizer.decode(new_tokens))


def _prepare_workdir(workdir: str, config: Any) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir!r} cannot be written ({e.strerror}); choose another.") from None
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
