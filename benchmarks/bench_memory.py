"""Continued-pretraining memory and evaluation-cost benchmark: RSS over a real run.

    python benchmarks/bench_memory.py [--steps=12 --every=4 --layers=30 --batch=2 --seq_len=512]

Builds a random Hugging Face Llama with SmolLM-135M's shapes (30 layers, d 576, 9 heads, 3 kv
heads, F 1536, vocab 49152, tied embeddings) and a small byte-level tokenizer in a temporary
directory, writes one long .txt of standard-library source as the domain corpus, and runs
`python -m jaxlm.main --config=configs/continue_pretraining.py:<dir>` in a subprocess with
evaluation and a checkpoint every `--every` steps. The child's resident memory (VmRSS) is
sampled every 50 ms and tagged with the phase its last output line announced. Reports:

- steady RSS: the largest RSS during the last training step before the first periodic
  evaluation (run `--every` >= 4 so the compile's memory is gone by then);
- peak RSS: the largest RSS of the whole run, compiling included, and its ratio to steady;
- RSS after the first periodic evaluation + checkpoint, and at the end;
- evaluation cost: seconds per periodic evaluation and per training step, and the share of
  wall time evaluation takes at the recipe's `eval.every` (computed from those two).

The model needs several GB: run one at a time on a shared machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
_STEPS = flags.DEFINE_integer("steps", 12, "Training steps of the run.")
_EVERY = flags.DEFINE_integer("every", 4, "Eval and checkpoint every N steps.")
_LAYERS = flags.DEFINE_integer("layers", 30, "Layers of the random base model.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Sequence length.")
_RECIPE_EVAL_EVERY = flags.DEFINE_integer("recipe_eval_every", 200, "For the eval share.")
_KEEP = flags.DEFINE_string("keep", "", "Keep the base model and workdir here.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "Extra --config.k=v for the run.")
SMOLLM = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)


def build_base(directory: str, layers: int) -> None:
    """A random SmolLM-shaped Llama with a 1,024-piece byte-level BPE tokenizer."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text(200_000).split("\n\n"), trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **dict(SMOLLM, num_hidden_layers=layers), bos_token_id=0, eos_token_id=0
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def corpus_text(limit: int) -> str:
    """Standard-library source, up to `limit` characters: real text every machine has."""
    root, parts, size = sysconfig.get_paths()["stdlib"], [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and size < limit:
            parts.append(open(os.path.join(root, name), encoding="utf-8").read())
            size += len(parts[-1])
    return "\n\n".join(parts)[:limit]


def rss_gb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def main(argv: list[str]) -> int:
    del argv
    root = _KEEP.value or tempfile.mkdtemp(prefix="bench_memory_")
    base, workdir = os.path.join(root, "base"), os.path.join(root, "run")
    if not os.path.isfile(os.path.join(base, "config.json")):
        os.makedirs(base, exist_ok=True)
        build_base(base, _LAYERS.value)
    book = os.path.join(root, "book.txt")
    with open(book, "w") as f:
        f.write(corpus_text(3_000_000))
    overrides = {
        "data.datasets.domain.paths": book,
        "data.cache_dir": os.path.join(root, "cache"),
        "data.curation.quality.preset": "none",
        "model.dtype": "float32",  # bf16 is emulated (slow) on CPU
        "train.steps": _STEPS.value,
        "train.batch_size": _BATCH.value,
        "train.seq_len": _SEQ_LEN.value,
        "train.log_every": 1,
        "eval.every": _EVERY.value,
        "checkpoint.every": _EVERY.value,
        "sample.max_tokens": 0,
        "optim.warmup_steps": 2,
    }
    cmd = [
        sys.executable,
        "-m",
        "jaxlm.main",
        f"--config=configs/continue_pretraining.py:{base}",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
        *(f"--config.{o}" for o in _OVERRIDE.value),
    ]
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    samples: list[tuple[float, str, float]] = []  # (time, phase, rss GB)
    phase = ["start"]

    def sample() -> None:
        while proc.poll() is None:
            try:
                samples.append((time.perf_counter() - start, phase[0], rss_gb(proc.pid)))
            except OSError:
                return
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    lines = []
    for line in proc.stdout:
        lines.append((time.perf_counter() - start, line.rstrip()))
        print(f"[{lines[-1][0]:7.1f}s {samples[-1][2] if samples else 0:5.2f} GB] {line}", end="")
        m = re.match(r"(step|eval)\s+(\d+)", line)
        if m:
            kind, step = m.group(1), int(m.group(2))
            if kind == "step":
                phase[0] = "train" if phase[0] in ("start", "train") else "after_eval"
            elif 0 < step < _STEPS.value:
                phase[0] = "after_eval"
    proc.wait()
    if proc.returncode:
        print(f"run failed with exit code {proc.returncode}")
        return 1

    def peak(ph: str) -> float:
        return max((r for _, p_, r in samples if p_ == ph), default=0.0)

    # Steady training: the last step before the first periodic eval (its line ends it).
    step_lines = [(t, line) for t, line in lines if re.match(r"step\s+\d+", line)]
    t_first = step_lines[0][0] if step_lines else 0.0
    window = [t for t, _ in step_lines[_EVERY.value - 2 : _EVERY.value]]
    steady = [r for t, _, r in samples if len(window) == 2 and window[0] <= t <= window[1]]
    evals = [re.match(r"eval\s+(\d+) .*\| ([\d.]+)s$", line) for _, line in lines]
    eval_times = [float(m.group(2)) for m in evals if m and 0 < int(m.group(1)) < _STEPS.value]
    step_s = None
    train_steps = [t for t, line in step_lines]
    if len(train_steps) >= 3:
        gaps = sorted(b - a for a, b in zip(train_steps[1:], train_steps[2:], strict=False))
        step_s = gaps[len(gaps) // 2]  # median: evals and saves sit in a few gaps
    result = {
        "steady_train_rss_gb": max(steady, default=0.0),
        "peak_rss_gb": max(r for _, _, r in samples),
        "peak_before_first_step_gb": max((r for t, _, r in samples if t <= t_first), default=0),
        "peak_after_first_eval_gb": peak("after_eval"),
        "end_rss_gb": next((r for _, _, r in reversed(samples) if r > 0), 0.0),
        "eval_s": eval_times,
        "step_s": step_s,
        "wall_s": time.perf_counter() - start,
    }
    result["peak_over_steady"] = result["peak_rss_gb"] / max(result["steady_train_rss_gb"], 1e-9)
    if eval_times and step_s:
        e = sum(eval_times) / len(eval_times)
        result["eval_share_at_recipe_every"] = e / (e + _RECIPE_EVAL_EVERY.value * step_s)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from jaxlm import cli

    cli.run_cli(main, require_config=False)
