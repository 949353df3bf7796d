"""The training job: data, state, the loop with eval, checkpoints, preemption and rollback.

`run(config, workdir)` is what `python -m jaxlm.main` does: prepare (or find) the data, build
the sharded state or restore it from the newest checkpoint in `workdir`, train, evaluate, save,
and print a sample. The pure pieces it drives (steps, `Setup`, `evaluate`) live in train.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jaxlm import checkpoint as ckpt_lib
from jaxlm import (
    faults,
    finish,
    goodput,
    hang,
    inputs,
    objectives,
    peers,
    resume,
    sharding,
    stages,
    storage,
    tiers,
    train,
    validate,
)
from jaxlm import metrics as metrics_lib
from jaxlm.data import manifest as manifest_lib
from jaxlm.data import stream as stream_lib
from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.evaluate import choices, retrieval
from jaxlm.evaluate import tasks as tasks_lib
from jaxlm.progress import Progress, format_duration


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the training job described by `config` in `workdir`.

    Returns a summary: start and final step, final train loss, final eval metrics, the gzip
    baseline, wall time, and whether the run was preempted.
    """
    spec = validate.check(config, workdir)  # every config error, before device or data work
    mirror = storage.WorkdirMirror(workdir)  # a bucket workdir: the run works on a local copy
    mirror.pull()
    workdir = mirror.local
    complete = finish.completed_run(spec, workdir)  # the same command again: nothing to redo
    if complete is not None:
        print(complete["line"], flush=True)
        return complete
    sharding.maybe_initialize_distributed(config.mesh)
    mesh = validate.check_devices(spec)
    _prepare_workdir(workdir, config)
    run_inputs = inputs.load(config, spec, workdir)
    manifest, tokenizer, vocab_size = (
        run_inputs.manifest,
        run_inputs.tokenizer,
        run_inputs.vocab_size,
    )
    # From here on every process runs the same collectives: a dead peer must stop the others.
    # (Not earlier: data preparation may hold the GIL for longer than the heartbeat timeout.)
    watchdog = peers.Watchdog().start()
    clean = False
    try:
        setup = train.Setup(spec, vocab_size, mesh)

        def publish() -> None:
            # A bucket workdir is sent once each save has finished: a step published there
            # is whole, and a kill -9 later resumes from it.
            if mirror.remote and jax.process_index() == 0:
                trainer.checkpointer.wait()
                mirror.push()

        trainer = Trainer(setup, workdir, manifest, tokenizer, publish)
        try:
            summary = trainer.train()
        except BaseException as e:
            # A dead peer: close() would wait for a save that needs it, so leave at once.
            peers.raise_if_peer_lost(e)
            trainer.close()
            publish()
            raise
        trainer.close()
        publish()
        clean = True
    finally:
        watchdog.stop(clean)
    # The sample runs on process 0's host arrays; on many processes it is left to tools/generate.py.
    if not summary["preempted"] and jax.process_count() == 1:
        finish.print_sample(setup, trainer.state["params"], tokenizer, trainer.out)
    trainer.out.close()
    return summary


@dataclasses.dataclass(frozen=True)
class Hook:
    """Work the loop does after step `n` when `n % every == 0` (and after the last step if
    `at_end`): logging, evaluation, checkpointing. `every=0` turns it off."""

    every: int
    fn: Callable[[int], Any]
    at_end: bool = True

    def due(self, done: int, total: int) -> bool:
        if done == total:
            return self.at_end
        return self.every > 0 and done % self.every == 0


class Trainer:
    """The training loop of one run: next(batch) -> step -> hooks, with preemption and
    rollback."""

    def __init__(
        self,
        setup: train.Setup,
        workdir: str,
        manifest: dict,
        tokenizer: Any,
        publish: Callable[[], None] = lambda: None,
    ):
        config = setup.config
        self.publish = publish  # sends the workdir's new files to its bucket (WorkdirMirror)
        self.config, self.setup, self.manifest = config, setup, manifest
        self.tokenizer = tokenizer
        self.objective = objectives.Objective.build(config, tokenizer, manifest)
        self.hooks = [
            Hook(config.train.log_every, self._log),
            Hook(config.eval.every, self._eval, at_end=False),  # the final one follows the loop
            Hook(config.checkpoint.every, self._save),
            Hook(config.checkpoint.local_every, self._save_local, at_end=False),
        ]
        self.tasks = tasks_lib.run_tasks(config, workdir, manifest, tokenizer)
        self.retrieval = retrieval.eval_of(config, manifest, tokenizer)
        self.planter = retrieval.planter_of(config, tokenizer)
        self.out = metrics_lib.Writer(workdir, config.logging, config.to_dict())
        self.goodput = goodput.Accountant(workdir, writes=jax.process_index() == 0)
        self.hang = hang.Watchdog.from_config(config.train)
        self.checkpointer = ckpt_lib.Checkpointer(
            os.path.join(os.path.abspath(workdir), "checkpoints"), config.checkpoint
        )
        self.local = (  # the fast local tier (jaxlm/tiers.py), if on
            tiers.LocalTier(config.checkpoint.local_dir, workdir)
            if config.checkpoint.local_every
            else None
        )
        self.plan = setup.plan
        self.batches = self._host_batches(config.data.streams or jax.process_count())
        self.meta = {
            "config": json.loads(config.to_json_best_effort()),
            "tokenizer_sha256": manifest["tokenizer"]["sha256"],
            "mesh_shape": dict(setup.mesh.shape),
            "param_shapes": ckpt_lib.param_shapes(setup.abstract_state["params"]),
        }
        self.out.print(
            f"model: {setup.n_params / 1e6:.2f}M parameters | mesh {dict(setup.mesh.shape)} preset "
            f"{config.mesh.preset} | {jax.device_count()} {jax.devices()[0].platform} device(s), "
            f"{jax.process_count()} process(es)"
        )
        self.step, self.state, data_state = resume.start(
            self.checkpointer, setup, self.meta["tokenizer_sha256"], self.out, self.local
        )
        if data_state is not None:
            self._set_data_state(self.step, data_state)
        self.goodput.resumed_at(self.step)
        self.hang.start()
        self.stream: Iterator[dict[str, np.ndarray]] = self.batches
        t = config.train
        if t.inject_nan_at or t.inject_spike_at or t.inject_hang_at:  # fault tests, wrapped once
            self.stream = faults.FaultyBatches(
                self.batches,
                nan_at=t.inject_nan_at,
                spike_at=t.inject_spike_at,
                hang_at=t.inject_hang_at,
                vocab_size=setup.model_cfg.vocab_size,
                drawn=self.step,
            )
        self.stage: stages.Stage | None = None  # the stage of the last step drawn
        self.evals_compiled: set[tuple] = set()  # RoPEs whose eval program exists
        self.programs_run: set[tuple] = set()  # `Stage.program_key`s of the steps compiled
        self.stop_signal: str | None = None
        self.in_eval = False
        self.best_eval = (0, float("inf"))  # (step, held-out loss)
        self.first_eval: dict[str, float] | None = None  # held-out metrics before training
        self.workdir = workdir
        self.previous_handlers = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def _on_signal(self, signum, frame) -> None:
        """The first signal asks the loop to save and stop at the next step boundary.

        An evaluation changes no state, so one in progress is abandoned at once (on one process;
        with many, every process must leave the collectives together, so it finishes first). A
        second Ctrl-C stops at once, keeping the checkpoints already written.
        """
        repeated = self.stop_signal is not None
        self.stop_signal = signal.Signals(signum).name
        if self.in_eval and jax.process_count() == 1:
            raise _EvalInterrupted
        if repeated and signum == signal.SIGINT:
            raise KeyboardInterrupt

    def _set_data_state(self, step: int, data_state: dict) -> None:
        # Streams are global: flatten the saved per-process lists, then take this host's part,
        # so a checkpoint written by N processes resumes on any process count.
        streams = [s for i in range(len(data_state)) for s in data_state[f"process_{i}"]]
        per_host = len(self.batches.iterators)
        if len(streams) != per_host * jax.process_count() and not self.config.data.streams:
            # data.streams=0 is "one per process" for a new run, and "as many as the run was
            # started with" for a resumed one: no flag is needed on another host count.
            self.batches = self._host_batches(len(streams))
            per_host = len(self.batches.iterators)
        if len(streams) != per_host * jax.process_count():
            raise ConfigError(
                f"the checkpoint at step {step} holds {len(streams)} data streams but this run "
                f"reads {per_host * jax.process_count()}; "
                f"set --config.data.streams={len(streams)}."
            )
        first = jax.process_index() * per_host
        self.batches.set_state(streams[first : first + per_host])

    def _host_batches(self, streams: int):
        """This host's training batches, read from `streams` document streams, with the
        objective's rewrites (FIM per document, masked/prefix per batch) made in the stream."""
        objective = self.objective
        return stream_lib.training_batches(
            self.setup.spec,
            self.manifest,
            jax.process_index(),
            jax.process_count(),
            streams,
            doc_transform=objective.doc_transform() or self.planter,
            batch_rewrite=objective.apply if objective.bidirectional else None,
        )

    def train(self) -> dict[str, Any]:
        cfg = self.config
        total = self.plan.total_steps
        self.clock = metrics_lib.Throughput(self.step, total, 0)
        self._enter_stage(self.plan.stage_at(self.step))
        self.pending, self.data_wait, self.last = [], 0.0, {}
        bad_steps: list[int] = []
        rollbacks: list[list[int]] = []
        previous_skip = None  # (step, device scalar) read one step late, to keep dispatch async
        start_step, start = self.step, time.perf_counter()

        # Every copy between host and devices in the loop is explicit (`host_to_global`,
        # `jax.device_get`): an implicit one (a host batch given to the step, a metric read as
        # a float) would stall the pipeline or, on many hosts, be wrong, so it is an error here.
        with jax.transfer_guard("disallow"):
            if self.step == 0 < total and cfg.init_from:
                # The "before" of a warm start, on the same batches as the final evaluation.
                self.first_eval = self._eval(0, final=True)
            while self.step < total:
                if self._should_stop():
                    return self._preempt(start_step, start)
                stage = self.plan.stage_at(self.step)
                if stage is not self.stage:
                    self._enter_stage(stage)
                self.goodput.enter("data")
                host_batch = self._next_batch()
                compiles = stage.program_key not in self.programs_run
                self.goodput.enter("compile" if compiles else "productive")
                if compiles:  # the call returns once the program is compiled
                    self.out.print(
                        f"compiling the training step for {stage.batch_size} x {stage.seq_len} "
                        "tokens (the first step waits for it)"
                    )
                    compile_start = time.perf_counter()
                # A compile (a new stage's shapes) gets the watchdog's allowance of slow work.
                with self.hang.slow() if compiles else contextlib.nullcontext():
                    self.state, step_metrics = self.train_step(
                        self.state, sharding.host_to_global(host_batch, self.setup.mesh)
                    )
                if compiles:
                    self.programs_run.add(stage.program_key)
                    self.out.print(
                        f"compiled in {time.perf_counter() - compile_start:.1f}s; training, "
                        f"one line every {cfg.train.log_every} steps"
                    )
                    self.goodput.enter("productive")
                self.step += 1
                self.pending.append(step_metrics)
                if previous_skip is not None:
                    skipped = int(jax.device_get(previous_skip[1]))
                    bad_steps = bad_steps + [previous_skip[0]] if skipped else []
                previous_skip = (self.step, step_metrics["skipped"])
                if len(bad_steps) >= cfg.train.max_bad_steps:
                    rollbacks.append(bad_steps)
                    self._rollback(bad_steps, rollbacks)
                    bad_steps, previous_skip = [], None
                    continue
                self.checkpointer.check()  # a save that failed in the background stops the run
                for hook in self.hooks:
                    if hook.due(self.step, total):
                        hook.fn(self.step)
                self.goodput.step_done(self.step)
                self.hang.step_done()

            final_eval = self._eval(total, final=True)

        with self.goodput.during("checkpoint"):
            self.checkpointer.wait()
        if self.local is not None:  # the final checkpoint is durable: the local tier is spent
            self.local.clear()
        goodput.report(self.goodput, self.out, self.step)
        if final_eval is None:
            self.out.print(
                f"stopped by {self.stop_signal} during the final evaluation: training is complete "
                f"and its checkpoint at step {self.step} is in {self.checkpointer.directory}; the "
                "final held-out numbers were skipped."
            )
            return self._summary(start_step, start, preempted=True)
        if "bits_per_byte" in final_eval:
            self.out.print(f"final held-out: {metrics_lib.final_figures(final_eval)}")
        summary = self._summary(
            start_step,
            start,
            eval=final_eval,
            gzip_bits_per_byte=final_eval.get("gzip_bits_per_byte"),
        )
        self.out.print(
            finish.summary_text(
                summary,
                self.plan.tokens_before(summary["final_step"]),
                self.best_eval,
                self.first_eval,
                self.checkpointer.directory,
                self.workdir,
            )
        )
        return summary

    def _enter_stage(self, stage: stages.Stage) -> None:
        """The stage's step program, throughput and FLOPs; the log names the stage."""
        tokens_per_step = stage.batch_size * stage.seq_len
        self.flops_per_step = self.setup.model_cfg.flops_per_token(stage.seq_len) * tokens_per_step
        self.clock.tokens_per_step = tokens_per_step
        self.train_step = self.setup.jit_train_step(stage)
        if len(self.plan.stages) > 1 or self.step == 0:
            self.out.print(f"step {self.step}: {stage.describe()}")
        self.stage = stage

    def _next_batch(self) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        batch = next(self.stream)
        self.data_wait += time.perf_counter() - t0
        return batch

    def _log(self, done: int) -> None:
        fetched = jax.device_get(self.pending)
        last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        last["lr"] = float(fetched[-1]["lr"])
        last["skipped"] = float(sum(m["skipped"] for m in fetched))
        timing = self.clock.update(done)
        last.update(timing, data_wait_s=self.data_wait / len(fetched))
        last["update_to_param"] = last["update_norm"] / max(last["param_norm"], 1e-12)
        peak = metrics_lib.peak_flops_per_device()
        if peak:
            last["mfu"] = self.flops_per_step / timing["step_time_s"] / (peak * jax.device_count())
        mem = metrics_lib.device_memory_gb()
        if mem is not None:
            last["memory_gb"] = mem
        self.pending, self.data_wait, self.last = [], 0.0, last
        last.update(  # the stage of the last step logged, and its shapes
            stage=self.stage.index,
            batch_size=self.stage.batch_size,
            seq_len=self.stage.seq_len,
        )
        self.out.write(done, {k: v for k, v in last.items() if k != "eta_s"}, prefix="train/")
        mfu = f" mfu {last['mfu']:.1%}" if "mfu" in last else ""
        skipped = f" | skipped {int(last['skipped'])}" if last["skipped"] else ""
        balance = last.get("moe_load_max_over_mean")  # an MoE model's routing (1: balanced)
        experts = f" | expert load max/mean {balance:.2f}" if balance is not None else ""
        self.out.print(
            f"step {done:>6}/{self.plan.total_steps} | loss {last['loss']:.4f} | "
            f"lr {last['lr']:.2e} | "
            f"grad {last['grad_norm']:.3f} | {last['tokens_per_s']:,.0f} tok/s{mfu}{skipped}"
            f"{experts} | "
            f"ETA {format_duration(timing['eta_s'])}"
        )

    def _eval(self, step: int, final: bool = False) -> dict[str, float] | None:
        """Held-out (and task) metrics at `step`, or None if a stop signal cut them short."""
        t0 = time.perf_counter()
        alone = jax.process_count() == 1  # many processes must all run the same collectives
        if alone and self.stop_signal is not None:  # arrived just before: do not start
            return None
        self.in_eval = True  # only while computing: a write to the logs is never cut in half
        try:
            with self.goodput.during("eval"), self.hang.slow():
                result = self._compute_eval(final)
        except _EvalInterrupted:
            return None
        finally:
            self.in_eval = False
        _return_freed_memory()
        self.out.write(step, result, prefix="eval/")
        if "loss" in result and result["loss"] < self.best_eval[1]:
            self.best_eval = (step, result["loss"])
        if "loss" in result:
            self.out.print(
                f"eval  {step:>6} | loss {result['loss']:.4f} | ppl {result['perplexity']:.2f} | "
                f"{result['bits_per_byte']:.3f} bits/byte{self._validation_summary(result)}"
                f"{objectives.summary(result)}{metrics_lib.task_summary(result)} | "
                f"{time.perf_counter() - t0:.1f}s"
            )
        return result

    def _validation_summary(self, result: dict[str, float]) -> str:
        """' | <set> X.XXX bits/byte' for each named validation set (data.validation)."""
        return "".join(
            f" | {name} {result[f'{name}/bits_per_byte']:.3f} bits/byte"
            for name in manifest_lib.validation_sets(self.manifest)
            if f"{name}/bits_per_byte" in result
        )

    def _compute_eval(self, final: bool) -> dict[str, float]:
        cap = 0 if final else self.config.eval.max_batches  # final numbers use the whole split
        stage = self.plan.stage_at(max(self.step - 1, 0))  # the model as last trained
        sets = train.eval_sets(self.setup, self.manifest, cap)
        n = sum(batches for _, _, batches in sets)
        what = f"{'final ' if final and self.step else ''}evaluation at step {self.step}"
        compiled = stage.rope in self.evals_compiled
        if cap == 0 or not compiled:  # a long one, or one that compiles first
            self.out.print(
                f"{what}: {n} batches{' (all held-out text)' if cap == 0 else ''}"
                + "".join(f", then {name} ({len(t)} examples)" for name, t in self.tasks.items())
                + ("; compiling its program first" if not compiled else "")
            )
        self.evals_compiled.add(stage.rope)
        result = train.evaluate(
            self.setup,
            self.setup.jit_eval_step(stage),
            self.state["params"],
            self.manifest,
            sets,
            self.objective,
            progress=Progress(what, n, "batches", print_fn=self.out.print),
        )
        gzip_bpb = self.manifest.get("val_gzip_bits_per_byte", {}).get("all")
        if final and gzip_bpb:  # the baseline beside the final figures, for reruns and plots
            result["gzip_bits_per_byte"] = gzip_bpb
        spec, graphdef = self.setup.spec, self.setup.graphdef_for(stage)
        if self.retrieval:
            batch = spec.eval_batch_size
            result.update(
                self.retrieval(graphdef, self.state["params"], batch, self.setup.mesh_rules)
            )
        if self.tasks:
            result.update(
                choices.score_tasks(
                    graphdef,
                    self.state["params"],
                    self.tokenizer,
                    self.tasks,
                    seq_len=spec.eval_seq_len,
                    batch_size=spec.eval_batch_size,
                    mesh_rules=self.setup.mesh_rules,
                )
            )
        return result

    def _save(self, done: int | None = None) -> None:
        """A checkpoint of the current step (forced, whatever `checkpoint.every` says, at the
        run's last step and when stopping)."""
        force = done is None or done == self.plan.total_steps
        # Meant copies, let through the loop's transfer guard: orbax reads the state to the host
        # with np.asarray, and the hosts' data positions are gathered through the devices.
        with jax.transfer_guard("allow"), self.goodput.during("checkpoint"), self.hang.slow():
            data_state = ckpt_lib.gather_host_states(self.batches.get_state())
            self.checkpointer.save(self.step, self.state, data_state, self.meta, force=force)
            self.publish()
        self.goodput.saved_at(self.step)
        _return_freed_memory()

    def _save_local(self, done: int) -> None:
        """A local-tier checkpoint: checkpoint time, and a slow block for the hang watchdog.
        Not `saved_at`: a host may lose its local tier."""
        with jax.transfer_guard("allow"), self.goodput.during("checkpoint"), self.hang.slow():
            data_state = ckpt_lib.gather_host_states(self.batches.get_state())
            self.local.save(self.step, self.state, data_state, self.meta)

    def _should_stop(self) -> bool:
        """Whether a stop signal arrived here or, on multi-host, on any process."""
        flag = self.stop_signal is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            with jax.transfer_guard("allow"):  # a meant copy, through the devices and back
                flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
            if flag and self.stop_signal is None:
                self.stop_signal = "a stop signal on another process"
        return flag

    def _preempt(self, start_step: int, start: float) -> dict[str, Any]:
        if self.step not in self.checkpointer.steps():
            self._save()
        with self.goodput.during("checkpoint"):
            self.checkpointer.wait()
        goodput.report(self.goodput, self.out, self.step)
        self.out.print(
            f"stopped by {self.stop_signal} at step {self.step}: checkpoint saved in "
            f"{self.checkpointer.directory}; run the same command to resume."
        )
        return self._summary(start_step, start, preempted=True)

    def _rollback(self, bad_steps: list[int], rollbacks: list[list[int]]) -> None:
        """Returns to the last good checkpoint; the data position stays, skipping bad batches."""
        if len(rollbacks) > self.config.train.max_rollbacks:
            raise TrainingError(
                f"training keeps failing: {len(rollbacks)} runs of "
                f"{self.config.train.max_bad_steps} "
                f"skipped steps (non-finite or spiking loss) at steps {rollbacks}; lower optim.lr, "
                "raise train.spike_ratio, or inspect the data around those steps."
            )
        self.checkpointer.wait()
        # A checkpoint written during the streak (detection lags a step) is not a good one.
        good = [s for s in self.checkpointer.steps() if s < bad_steps[0]]
        self.checkpointer.delete_after(good[-1] if good else 0)
        if self.local is not None:  # local steps of the streak are not good ones either
            self.local.delete_after(good[-1] if good else 0)
        if not good:
            self.step, self.state = 0, self.setup.init_state()
        else:
            self.step, self.state, _, _ = self.checkpointer.restore(
                self.setup.abstract_state, good[-1]
            )
        self.goodput.resumed_at(self.step)
        self.pending = []
        self.out.print(
            f"rollback: steps {bad_steps} were skipped in a row; back to step {self.step}, "
            "continuing with the batches after the bad ones"
        )
        self.out.write(self.step, {"rollbacks": len(rollbacks)}, prefix="train/")

    def _summary(self, start_step: int, start: float, **extra) -> dict[str, Any]:
        return dict(
            start_step=start_step,
            final_step=self.step,
            train_loss=self.last.get("loss"),
            wall_s=time.perf_counter() - start,
            **{"preempted": False, **extra},
        )

    def close(self) -> None:
        """Waits for the last save and gives the signals back to their previous handlers."""
        self.hang.stop()
        try:
            self.checkpointer.close()
        finally:
            for sig, handler in self.previous_handlers.items():
                signal.signal(sig, handler)


def _return_freed_memory() -> None:
    """Hands the host memory an evaluation or a checkpoint save freed back to the OS.

    Both allocate and free gigabytes on the host (eval programs' buffers, the checkpoint's
    host copy and its writer threads' buffers); glibc keeps freed memory in its arenas, so
    without this the process's RSS stays at that high-water mark for the rest of the run.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class TrainingError(JaxlmError):
    """The run cannot make progress (repeated non-finite or spiking losses)."""


class _EvalInterrupted(Exception):
    """Raised by the signal handler to abandon an evaluation (which changes no state)."""


def _prepare_workdir(workdir: str, config: Any) -> None:
    # validate.check has made the workdir and proved it writable.
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
