"""Shared builders for tests: prime-sized model configs and packed batches, tiny Hugging Face
models and tokenizers, stdlib corpora and their prepared shards, synthetic manifests and the
reading of packed rows back into documents.

torch, transformers and tokenizers (the [test] extra) are imported by the functions that use
them, so a test that only needs a config does not pay for them.
"""

import dataclasses
import glob
import inspect
import json
import json.decoder
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from configs import base
from jaxlm import model as model_lib
from jaxlm import objectives
from jaxlm.convert import hf
from jaxlm.data import curate, files, manifest, records, sources, tokenizer

VOCAB = 61  # prime, so a swapped vocab/other axis cannot pass by accident
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every recipe in configs/, found by glob (base.py holds the defaults they start from).
RECIPES = sorted(
    name
    for name in (os.path.basename(p)[: -len(".py")] for p in glob.glob(f"{REPO}/configs/*.py"))
    if name not in ("base", "__init__")
)


def tiny_config(**model_overrides) -> ml_collections.ConfigDict:
    """A config whose model is small enough to compile in a few seconds on CPU."""
    c = base.get_config()
    c.model.d_model = 40
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.head_dim = 10
    c.model.d_ff = 56
    c.model.max_seq_len = 64
    c.model.attention = "xla"
    for k, v in model_overrides.items():
        setattr(c.model, k, v)
    c.train.batch_size = 8
    c.train.seq_len = 16
    c.train.steps = 20
    c.optim.warmup_steps = 2
    c.optim.lr = 1e-2
    return c


def packed_batch(batch: int, seq_len: int, seed: int = 0, vocab: int = VOCAB) -> dict:
    """Random tokens packed as 1-3 documents per row, with the batch contract's fields."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    segment_ids = np.zeros((batch, seq_len), np.int32)
    positions = np.zeros((batch, seq_len), np.int32)
    for b in range(batch):
        cuts = sorted(rng.choice(np.arange(1, seq_len), rng.randint(0, 3), replace=False))
        bounds = [0, *cuts, seq_len]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            segment_ids[b, lo:hi] = s + 1
            positions[b, lo:hi] = np.arange(hi - lo)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": np.ones((batch, seq_len), np.float32),
    }


def param_sizes(cfg: model_lib.ModelConfig) -> dict[str, int]:
    """Element count of each parameter by path ('blocks/0/attn/wq'), read from the model's state."""
    state = nnx.state(model_lib.abstract(cfg), nnx.Param)
    return {"/".join(map(str, path)): math.prod(v.shape) for path, v in nnx.to_flat_state(state)}


def forward_matmul_flops(cfg: model_lib.ModelConfig, seq_len: int) -> int:
    """FLOPs (2 per multiply-add) of every dot_general in the model's traced forward pass over
    one sequence of `seq_len` tokens: what the program computes, not a formula."""
    graphdef, params = nnx.split(model_lib.abstract(cfg))
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return _dot_flops(jax.make_jaxpr(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens).jaxpr)


def _dot_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            depth = math.prod(eqn.invars[0].aval.shape[d] for d in contracting)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * depth
        repeats = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():  # the bodies of jit, scan, remat, custom_jvp calls
            inner = getattr(value, "jaxpr", value)
            if isinstance(inner, jax.extend.core.Jaxpr):
                total += repeats * _dot_flops(inner)
    return total


# --------------------------------------------------------------------------- Hugging Face models

HF_VOCAB = 67  # prime: a swapped vocab/other axis cannot pass by accident
BPE_VOCAB = 307  # prime; byte-level BPE needs at least 256 + 3


def make_hf_model(path, seed=0, vocab=HF_VOCAB, max_shard_size=None, **overrides):
    """A randomly initialised tiny transformers Llama saved to `path`; returns the torch model."""
    import torch
    import transformers

    kw = dict(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=52,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():  # norms start at 1: randomise them so a swapped norm cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **extra)
    return model


def hf_logits(model, tokens) -> np.ndarray:
    """A transformers model's float32 logits for int tokens [B, L]."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def transformers_nll(model, tok, texts, seq_len, stride):
    """Summed nll and target count of the documented windows, computed with transformers; for
    the default stride the windows are lm-eval's own rolling windows."""
    import torch
    from lm_eval.utils import get_rolling_token_windows

    bos = tok.token_to_id("<s>")
    nll, count, pending = 0.0, 0, []
    for doc in texts:
        ids = tok.encode(doc, add_special_tokens=False).ids
        if stride == seq_len:
            windows = list(get_rolling_token_windows(ids, bos, seq_len, context_len=1))
        else:  # token j of t = [BOS] + ids is scored in the first window ending at or after j
            t, windows, previous = [bos, *ids], [], 0
            for end in [*range(seq_len, len(ids), stride), len(ids)]:
                windows.append((t[max(0, end - seq_len) : end], t[previous + 1 : end + 1]))
                previous = end
        pending += windows
    # One forward pass per window length (the windows of one length are a batch).
    for length in sorted({len(inputs) for inputs, _ in pending}):
        group = [(i, t) for i, t in pending if len(i) == length]
        logits = hf_logits(model, [i for i, _ in group])
        for row, (inputs, targets) in zip(logits, group, strict=True):
            logp = torch.log_softmax(torch.tensor(row), -1).numpy()
            n = len(targets)
            nll -= sum(logp[len(inputs) - n + i, targets[i]] for i in range(n))
            count += n
    return nll, count


def read_params(hf_dir):
    """(ModelConfig, params as a nested dict) read from a Hugging Face directory by jaxlm."""
    cfg = model_lib.ModelConfig.from_hf(hf.read_hf_config(hf_dir))
    flat = {t.path: w for t, w in hf.iter_hf_params(hf_dir, cfg)}
    return cfg, traverse_util.unflatten_dict(flat)


def write_bpe_tokenizer(path):
    """A byte-level BPE tokenizer.json of BPE_VOCAB pieces that adds <s> like Llama's, plus the
    files transformers' AutoTokenizer reads; trained on Python source."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    source = inspect.getsource(json.decoder)
    tok.train_from_iterator(
        source.split("\n\n"),
        trainers.BpeTrainer(
            vocab_size=BPE_VOCAB,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return tok


# --------------------------------------------------------------------------- prepared corpora


def copy_stdlib_subset(dst, every: int, offset: int, limit: int) -> list[str]:
    """Copies real stdlib files (< 40 KB) into dst as flat .py files; returns their names."""
    os.makedirs(dst, exist_ok=True)
    names = []
    for f in sources.stdlib_files()[offset::every]:
        if f.size < 40_000:
            name = f.name.replace("/", "__")
            shutil.copyfile(f.path, os.path.join(dst, name))
            names.append(name)
        if len(names) == limit:
            break
    return names


def data_configs(paths: str, cache_dir, **data) -> tuple[ml_collections.ConfigDict, ...]:
    """(data, tokenizer) config sections for one 'code' dataset at `paths` and a 400-piece BPE;
    `data` overrides fields of the data section."""
    d = ml_collections.ConfigDict()
    d.cache_dir = str(cache_dir)
    d.datasets = ml_collections.ConfigDict(
        {"code": ml_collections.ConfigDict(dict(paths=paths, text_field="text", weight=1.0))}
    )
    d.val_fraction = 0.15
    d.num_proc = 1
    d.docs_per_shard = 16
    d.curation = curate.default_config()
    d.update(data)
    t = ml_collections.ConfigDict(
        dict(
            path="",
            model_type="bpe",
            vocab_size=400,
            sample_bytes=300_000,
            byte_fallback=True,
            code_safe=True,
        )
    )
    return d, t


class Log(list):
    """A `log=` callable for `prepare` that keeps every line it is given."""

    def __call__(self, line: str) -> None:
        self.append(line)


def decoded_shards(manifest_path) -> dict[str, list[str]]:
    """The 'code' dataset's documents per split, decoded from the prepared shards."""
    m = manifest.load(manifest_path)
    root = os.path.dirname(manifest_path)
    tok = tokenizer.load(os.path.join(root, m["tokenizer"]["file"]))
    out = {}
    for split in ("train", "val"):
        out[split] = []
        for shard in m["datasets"]["code"][split]["shards"]:
            for ids in records.read_shard(os.path.join(root, shard["path"])):
                assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
                out[split].append(tok.decode(ids[:-1]))
    return out


# --------------------------------------------------------------------------- packed streams

PAD, BOS, EOS = 0, 1, 2


@dataclasses.dataclass
class FakeTokenizer:
    """The tokenizer interface `objectives.Objective.build` reads, for synthetic ids (no text):
    `[MASK]` is id vocab_size - 2, the FIM sentinels prefix, middle, suffix the last three."""

    objective: str
    vocab_size: int = 1000
    bos_id: int = BOS
    eos_id: int = EOS
    pad_id: int = PAD
    unk_id: int = 3
    path: str = ""

    def id_to_piece(self, i: int) -> str:
        return f"w{i}"

    def piece_to_id(self, piece: str) -> int | None:
        v = self.vocab_size
        ids = {objectives.MASK_PIECE: v - 2} if self.objective == "masked" else {}
        if self.objective == "fim":
            ids = dict(zip(objectives.FIM_PIECES, (v - 3, v - 2, v - 1), strict=True))
        return ids.get(piece)


BODY = (100, 997)  # document body token ids: never a tag, BOS, EOS or padding


def synthetic_docs(rng: np.random.RandomState, n: int, tag: int, max_len: int) -> list[list[int]]:
    """`n` documents whose first token is `tag`, of 1..max_len ids (EOS not included)."""
    return [[tag, *rng.randint(*BODY, size=rng.randint(0, max_len)).tolist()] for _ in range(n)]


def write_manifest(root, datasets: dict[str, dict], docs_per_shard: int = 500) -> dict:
    """Writes shards + manifest.json in the `prepare` schema and loads it like training does.

    Args:
      root: output folder.
      datasets: name -> {'weight': float, 'train': [ids, ...], 'val': [ids, ...]}.
      docs_per_shard: documents per ArrayRecord shard (several shards exercise the source).
    """
    root = str(root)
    # A stand-in tokenizer file: these tests never decode, but loading checks its hash.
    with open(os.path.join(root, "tokenizer.model"), "wb") as f:
        f.write(b"synthetic documents need no tokenizer")
    sha = files.file_sha256(os.path.join(root, "tokenizer.model"))
    tok = {"file": "tokenizer.model", "sha256": sha, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD}
    m = {"tokenizer": tok, "datasets": {}}
    for name, spec in datasets.items():
        entry: dict = {"weight": spec.get("weight", 1.0)}
        for split in ("train", "val"):
            writer = records.ShardWriter(
                root, f"{split}/{name}-{{index:05d}}.array_record", docs_per_shard
            )
            for ids in spec.get(split, []):
                writer.write(records.encode_record(ids, EOS), len(ids) + 1, 4 * len(ids))
            shards = [s.to_dict() for s in writer.close()]
            entry[split] = {"shards": shards}
            for k in ("documents", "tokens", "bytes"):
                entry[split][k] = sum(s[k] for s in shards)
        m["datasets"][name] = entry
    path = os.path.join(root, "manifest.json")
    with open(path, "w") as f:
        json.dump(m, f)
    return manifest.load(path)


def batch_rows(batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """The rows of a batch stream, in order, each a dict of (L,) arrays."""
    for batch in batches:
        for r in range(batch["inputs"].shape[0]):
            yield {k: v[r] for k, v in batch.items()}


def row_segments(row: dict[str, np.ndarray]) -> list[slice]:
    """Each segment's span in a packed row, after checking the row's layout.

    Segment ids run 1, 2, ..., k in contiguous blocks with padding (0) only after them, so
    the same-segment attention mask never joins two documents; positions count from 0 inside
    every segment; loss_mask is exactly the non-padding tokens.
    """
    seg, pos = row["segment_ids"], row["positions"]
    for k in ("inputs", "targets", "segment_ids", "positions"):
        assert row[k].dtype == np.int32, k
    np.testing.assert_array_equal(row["loss_mask"], (seg > 0).astype(np.float32))
    used = int(np.count_nonzero(seg))
    assert np.all(seg[used:] == 0), "padding must come after every segment"
    assert np.all(row["targets"][used:] == 0) and np.all(pos[used:] == 0)
    spans = []
    start = 0
    for s in range(1, int(seg.max(initial=0)) + 1):
        n = int(np.count_nonzero(seg == s))
        assert n > 0 and np.all(seg[start : start + n] == s), f"segment {s} is not contiguous"
        np.testing.assert_array_equal(pos[start : start + n], np.arange(n))
        spans.append(slice(start, start + n))
        start += n
    assert start == used
    return spans


def document_ids(doc: tuple[np.ndarray, np.ndarray]) -> tuple[int, ...]:
    """A reassembled document's ids (from `packed_documents`), after checking inputs =
    [BOS] + ids and targets = ids + [EOS]."""
    x, y = doc
    ids = y[:-1]
    assert y[-1] == EOS and EOS not in ids and BOS not in ids
    np.testing.assert_array_equal(x, np.concatenate([[BOS], ids]))
    return tuple(ids.tolist())


def train_losses(workdir) -> dict[int, float]:
    """{step: train loss} from a run's metrics.jsonl (one line per step: a resume trims it)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "train/loss" in row:
                assert row["step"] not in out, f"step {row['step']} logged twice"
                out[row["step"]] = row["train/loss"]
    return out


def packed_documents(
    rows: Iterable[dict[str, np.ndarray]], bos: int = BOS, eos: int = EOS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) of each document, reassembled across rows in stream order."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for row in rows:
        spans = row_segments(row)
        for i, sl in enumerate(spans):
            x, y = row["inputs"][sl], row["targets"][sl]
            if x[0] == bos:
                assert not ys, "a document started before the previous one ended"
            else:
                assert i == 0 and ys, "only a row's first segment may continue a document"
            xs.append(x)
            ys.append(y)
            if y[-1] == eos:
                yield np.concatenate(xs), np.concatenate(ys)
                xs, ys = [], []
            else:
                assert sl.stop == len(row["inputs"]), "an unfinished document must fill its row"


def lane_documents(
    batches: Iterable[dict[str, np.ndarray]], streams: int = 1, bos: int = BOS, eos: int = EOS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) of each document of a training stream's batches, in the order the
    stream drew them (the order of their first tokens, batch by batch, row by row), each as soon
    as it and every document drawn before it are complete.

    Row r of a stream's part of a batch continues that stream's lane r (`jaxlm.data.stream`); a
    batch of fewer rows than the last sets the lanes it cuts off waiting, and they are continued
    first, in order.
    """
    started: list[list] = []  # per document drawn: [x parts, y parts, finished]
    done = 0  # documents yielded
    lanes: list[dict[int, list | None]] = [{} for _ in range(streams)]
    waiting: list[list[list]] = [[] for _ in range(streams)]
    for batch in batches:
        parts = {k: np.split(v, streams) for k, v in batch.items()}
        for s in range(streams):
            n_rows = parts["inputs"][s].shape[0]
            for r in sorted(lanes[s]):
                if r >= n_rows and lanes[s][r] is not None:
                    waiting[s].append(lanes[s].pop(r))
            for r in range(n_rows):
                row = {k: v[s][r] for k, v in parts.items()}
                for i, sl in enumerate(row_segments(row)):
                    x, y = row["inputs"][sl], row["targets"][sl]
                    if x[0] == bos:
                        assert lanes[s].get(r) is None, "a document started before its lane's ended"
                        doc = [[], [], False]
                        started.append(doc)
                    elif lanes[s].get(r) is not None:
                        assert i == 0, "a lane's document continues at its row's start"
                        doc = lanes[s][r]
                    else:  # a lane cut off by a smaller batch, taken over by this one
                        assert waiting[s], "a document continued that no lane held"
                        doc = waiting[s].pop(0)
                    doc[0].append(x)
                    doc[1].append(y)
                    if y[-1] == eos:
                        doc[2], lanes[s][r] = True, None
                    else:
                        assert sl.stop == len(row["inputs"]), "an unfinished document fills its row"
                        lanes[s][r] = doc
                while done < len(started) and started[done][2]:
                    yield np.concatenate(started[done][0]), np.concatenate(started[done][1])
                    started[done], done = None, done + 1


def jaxlm_logits(cfg, params, tokens):
    """A jaxlm model's logits for `tokens`, from its config and params (no mesh)."""
    graphdef, _ = nnx.split(model_lib.abstract(cfg))
    return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens)))


def one_sentence(excinfo):
    """The message of a raised error, checked to be one sentence."""
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


# A run of `python -m jaxlm.main` on prepared data that compiles in seconds (subprocess tests).
RUN_CONFIG = """
from configs import tiny


def get_config():
    c = tiny.get_config()
    c.data.manifest = {manifest!r}
    c.data.datasets.code = c.data.datasets.stdlib  # the name data_configs prepares under
    del c.data.datasets["stdlib"]
    c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
    c.model.max_seq_len = 32
    c.train.update(seq_len=32, batch_size=8, grad_accum=1, steps={steps}, log_every=1)
    c.optim.warmup_steps = 2
    c.eval.update(every=0, max_batches=2, next_line_examples=0)
    c.checkpoint.every = {checkpoint_every}
    c.sample.max_tokens = 0
    return c
"""


def write_run_config(path, manifest: str, steps: int, checkpoint_every: int) -> str:
    """Writes a config file (RUN_CONFIG) training on `manifest`; returns its path."""
    path.write_text(
        RUN_CONFIG.format(manifest=manifest, steps=steps, checkpoint_every=checkpoint_every)
    )
    return str(path)


def export_and_reload(hf_dir, torch_model, tmp_path):
    """`hf_dir` imported into jaxlm, exported again and loaded by transformers, checked to be the
    same class with every tensor of `torch_model` bit for bit; returns the reloaded model."""
    import torch
    import transformers

    from jaxlm.convert import hf

    hf.import_hf(hf_dir, str(tmp_path / "w"), progress=False)
    out = hf.export_hf(str(tmp_path / "w"), str(tmp_path / "out"), progress=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(torch_model)
    theirs, ours = torch_model.state_dict(), reloaded.state_dict()
    assert sorted(theirs) == sorted(ours)
    for name, tensor in theirs.items():
        assert torch.equal(tensor, ours[name]), name
    return reloaded


def continue_pretraining_cli(base_model, workdir, overrides: dict) -> str:
    """`python -m jaxlm.main --config=configs/continue_pretraining.py:<base_model>` with `overrides`
    on one CPU device, checked to succeed; returns its stdout."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm.main",
            f"--config=configs/continue_pretraining.py:{base_model}",
            f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items()),
        ],
        cwd=REPO,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout
