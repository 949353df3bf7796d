"""Defaults for every jaxlm run; recipes in this folder start from `get_config()` and override.

Not a run on its own: use a recipe such as configs/tiny.py.
"""

import ml_collections
from ml_collections import config_dict

from jaxlm import objectives
from jaxlm.data import curate


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"  # run name; the default --workdir is runs/<name>
    c.seed = 0  # seeds parameter init and data order
    c.objective = "causal"  # causal | masked | prefix | fim (see jaxlm/objectives.py)
    c.objectives = objectives.default_config()  # options of the non-causal objectives
    c.init_from = ""  # 'hf:<HF model dir>' | 'ckpt:<workdir or step dir>' | '' = random init
    # With init_from='ckpt:...': continue that checkpoint's whole state (optimizer, step, data
    # position) under this config's stages, e.g. a cool-down branched from a stable phase.
    c.branch = False

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 512  # D, residual stream width
    c.model.n_layers = 8  # transformer blocks
    c.model.n_heads = 8  # H, query heads
    c.model.n_kv_heads = 8  # K, key/value heads (K < H is grouped-query attention)
    c.model.head_dim = 64  # E, width of one head
    c.model.d_ff = 1536  # F, MLP hidden width
    c.model.max_seq_len = 2048  # longest sequence the model is built for (positions)
    c.model.rope_theta = 10000.0  # RoPE base frequency
    # Llama-3 RoPE scaling (factor, low_freq_factor, high_freq_factor, original_max_pos) or None.
    c.model.rope_scaling = config_dict.placeholder(tuple)
    c.model.norm_eps = 1e-5  # RMSNorm epsilon
    c.model.tie_embeddings = False  # share the input embedding with the output projection
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.remat = "none"  # activation recomputation: none | full | dots
    c.model.attention = "auto"  # auto (GPU cudnn, TPU splash, else xla) | xla | cudnn | splash
    # Attention over a sequence split by mesh.preset=cp_*: none | all_gather | ring (see
    # jaxlm/context.py; docs/long_context.md).
    c.model.context_parallel = "none"
    c.model.scan_layers = False  # run the blocks under one lax.scan: compile time flat in depth
    c.model.init_std = 0.02  # std of the normal init of weight matrices
    # Architecture switches, all off: the Llama block (docs/families.md; set by init_from=hf:...).
    c.model.qkv_bias = False  # biases on the q, k, v projections (Qwen2)
    c.model.qk_norm = "none"  # none | head (RMSNorm per head: Qwen3, Gemma-3) | full (OLMo-2)
    c.model.norm_placement = "pre"  # pre | post (on sublayer outputs: OLMo-2) | both (Gemma)
    c.model.norm_plus_one = False  # RMSNorm scales by (1 + w), w starts at 0 (Gemma)
    c.model.embed_scale = False  # multiply embeddings by sqrt(d_model) (Gemma)
    # silu (SwiGLU) | gelu_tanh (GeGLU, Gemma) | relu2 (ReLU², ungated: two matrices, not
    # three; the same parameter count as SwiGLU takes d_ff = 1.5 x the SwiGLU d_ff).
    c.model.mlp_act = "silu"
    c.model.sliding_window = 0  # W tokens (the query's own and W - 1 before); 0: none
    c.model.global_every = 0  # with a window: every Nth layer attends globally; 0: none does
    c.model.rope_local_theta = 0.0  # RoPE base of windowed layers (Gemma-3); 0: rope_theta
    c.model.attn_softcap = 0.0  # attention logits -> c * tanh(logits / c); 0: off
    c.model.final_softcap = 0.0  # output logits -> c * tanh(logits / c); 0: off
    c.model.query_scale_dim = 0  # attention scale is this**-0.5 (Gemma-3); 0: head_dim
    # Speedrun switches (issue 26), all off.
    c.model.zero_init_out = False  # attention's wo and the MLP's w_down start at zero
    # Value embeddings: n extra (vocab x kv heads x head dim) tables; table i adds its lookup of
    # the input tokens, times a learned per-kv-head gate, to the attention values of layer i and
    # layer n_layers - n + i (modded-nanogpt's U shape). 0: off. Not with scan_layers.
    c.model.value_embeds = 0
    # Multi-token prediction: k extra heads, head j predicting the token j + 1 places after the
    # next from the final hidden state (a residual D x D map and a norm before the output
    # head); trained with weight train.mtp_weight, dropped at export. 0: off. Causal only.
    c.model.mtp_heads = 0
    c.model.family = ""  # HF family to export as (llama, qwen2, ...); "": implied by switches
    # Mixture of experts (jaxlm/moe.py) in place of the MLP of the sparse layers; off when
    # n_experts = 0 (the dense model, bit for bit).
    c.model.moe = ml_collections.ConfigDict()
    c.model.moe.n_experts = 0  # X routed experts; 0: dense model
    c.model.moe.top_k = 2  # experts each token is sent to
    c.model.moe.expert_d_ff = 0  # hidden width of each expert (and shared expert); 0: d_ff
    c.model.moe.n_shared_experts = 0  # experts every token passes through, unweighted
    c.model.moe.router = "softmax"  # softmax | sigmoid: router logits -> scores (fp32)
    c.model.moe.normalize_top_k = True  # top-k weights sum to 1 (Mixtral, Qwen3-MoE; not OLMoE)
    c.model.moe.aux_loss_coef = 0.01  # weight of the load-balance loss (Switch/OLMoE form)
    c.model.moe.z_loss_coef = 0.0  # weight of the router z-loss (mean squared logsumexp)
    # DeepSeek-V3 auxiliary-loss-free balancing: each step, every expert's selection bias
    # moves this much toward balance (set aux_loss_coef small or 0 with it); 0: no bias.
    c.model.moe.bias_update_rate = 0.0
    c.model.moe.capacity_factor = 0.0  # 0: dropless; else slots per expert = factor * L * k / X
    c.model.moe.grouped_matmul = "auto"  # auto (TPU: gmm, GPU: ragged, CPU: tiled) or one
    c.model.moe.first_dense_layers = 0  # the first n layers keep the dense MLP
    c.model.moe.every = 1  # after those, every k-th layer is sparse (1: all of them)

    c.data = ml_collections.ConfigDict()
    c.data.manifest = ""  # a prepared manifest.json to train on; '' = prepare/reuse from datasets
    c.data.cache_dir = ""  # root of prepared-data caches; '' = $JAXLM_CACHE or ~/.cache/jaxlm
    c.data.datasets = ml_collections.ConfigDict()
    c.data.datasets.stdlib = ml_collections.ConfigDict()
    c.data.datasets.stdlib.paths = "stdlib"  # comma-separated globs/dirs, or 'stdlib'
    c.data.datasets.stdlib.text_field = "text"  # JSONL key / Parquet column with the text
    c.data.datasets.stdlib.weight = 1.0  # mixture weight (normalised over datasets)
    # Text files (.txt/.md/.rst/.py) -> documents: file (one each) | paragraphs (blank-line
    # separated) | N (pieces of at most N characters, cut at paragraph/line ends).
    c.data.datasets.stdlib.split = "file"
    # Named validation sets, evaluated at every eval beside the held-out split and never trained
    # on (training documents with the same text are dropped): data.validation.<name> =
    # ConfigDict(paths='comma-separated globs', text_field='text'). Read whole, not curated.
    c.data.validation = ml_collections.ConfigDict()
    c.data.val_fraction = 0.02  # share of documents held out, chosen by content hash
    c.data.num_proc = 0  # tokenization worker processes; 0 = os.cpu_count()
    c.data.docs_per_shard = 2000  # documents per ArrayRecord shard
    c.data.max_document_bytes = 8 * 2**20  # bytes (8 MiB); a longer JSONL line/file: too_large
    c.data.streams = 0  # independent document streams per global batch; 0 = one per process
    # A long-context drill: passkey pairs planted per 1,000 training tokens (see
    # jaxlm/evaluate/retrieval.py); 0 = off. Causal objective only.
    c.data.passkeys_per_1k = 0.0
    c.data.passkey_max_gap = 1024  # tokens from a planted passkey to its question, at most
    c.data.curation = curate.default_config()

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # existing sentencepiece .model to use; '' = train one
    c.tokenizer.model_type = "bpe"  # bpe | unigram | char
    c.tokenizer.vocab_size = 4096  # pieces, including byte-fallback and special tokens
    c.tokenizer.sample_bytes = 20_000_000  # cap on text read to train the tokenizer (bytes)
    c.tokenizer.byte_fallback = True  # unknown characters become bytes, never <unk>
    c.tokenizer.code_safe = True  # identity normalization, whitespace preserved

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-4  # peak learning rate
    c.optim.init_lr = 0.0  # learning rate at step 0 (warmup starts here)
    c.optim.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak
    c.optim.warmup_steps = 100  # linear warmup steps
    c.optim.schedule = "cosine"  # decay after warmup: cosine | linear | wsd | constant
    c.optim.decay_fraction = 0.2  # wsd only: share of steps spent decaying at the end
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.95  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.weight_decay = 0.1  # decoupled weight decay (times each group's wd_scale)
    c.optim.clip_norm = 1.0  # global gradient-norm clip; 0 = off
    c.optim.name = "adamw"  # adamw | muon (block matrices; AdamW for the rest) | lion
    # Parameter groups: attention/MLP matrices, embedding + output head, norm scales. Each has
    # its own learning rate (lr_scale x the schedule) and weight decay (wd_scale x weight_decay).
    c.optim.groups = ml_collections.ConfigDict()
    for group, wd_scale in (("matrix", 1.0), ("embedding", 1.0), ("vector", 0.0)):
        c.optim.groups[group] = ml_collections.ConfigDict(dict(lr_scale=1.0, wd_scale=wd_scale))
    # The untied output head (lm_head) in a group of its own: set either scale (None: the
    # embedding group's); both None keeps the head in the embedding group.
    c.optim.groups.head = ml_collections.ConfigDict()
    c.optim.groups.head.lr_scale = config_dict.placeholder(float)  # x optim.lr for lm_head
    c.optim.groups.head.wd_scale = config_dict.placeholder(float)  # x optim.weight_decay
    c.optim.muon = ml_collections.ConfigDict()  # optim.name=muon only: the matrix group
    c.optim.muon.lr = 0.02  # peak Muon step size (follows the same schedule shape as optim.lr)
    c.optim.muon.beta = 0.95  # momentum
    c.optim.muon.ns_steps = 5  # Newton-Schulz iterations
    c.optim.muon.consistent_rms = 0.0  # >0: scale updates to this RMS (then muon.lr ~ optim.lr)
    # newton_schulz (Muon's fixed quintic) | polar_express (per-iteration optimal coefficients,
    # ns_steps <= 5) | normuon (Newton-Schulz, then each output neuron divided by the root of
    # an EMA of its mean squared update, the matrix's norm kept)
    c.optim.muon.variant = "newton_schulz"
    c.optim.muon.beta2 = 0.95  # normuon only: decay of the per-neuron second moment
    # newton_schulz / normuon: the iterations as one scanned loop instead of unrolled. The same
    # update; on a 2-core CPU the loop is 2.1x faster on tiny's 384-wide matrices, unrolled 8%
    # faster on 4 scanned layers 128 wide (docs/perf.md, "Muon's orthogonalization"). It changes
    # the optimizer state's shape (optax keeps the coefficients there): fixed for a run's life.
    c.optim.muon.ns_loop = False

    # Training stages, in order (see jaxlm/stages.py): each a dict with a budget (steps=<n> or
    # tokens=<n>) and any of weights, seq_len, batch_size, lr (a schedule segment), rope_theta,
    # rope_scaling. () = one stage made of train.* and optim.*; with stages, train.steps = 0.
    c.stages = ()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000  # optimizer steps
    c.train.batch_size = 32  # global batch, in sequences
    c.train.seq_len = 512  # L, tokens per sequence
    c.train.grad_accum = 1  # micro-batches per step (batch_size must divide by it)
    # Cross-entropy in vocabulary tiles of this many entries (jaxlm/loss.py): the same loss and
    # gradients without the (batch, length, vocab) logits in memory. 0: the whole logits.
    c.train.loss_chunk = 0
    # z-loss: adds this x mean(logsumexp(logits)^2) over target tokens to the training loss (and
    # to the logged train loss; never to held-out losses), e.g. 1e-4 (PaLM). 0: off.
    c.train.z_loss = 0.0
    # Multi-token prediction (model.mtp_heads > 0): the mean of the extra heads' cross-entropies
    # enters the training loss times this weight (never the logged loss, reported as mtp_loss).
    c.train.mtp_weight = 0.3
    c.train.log_every = 10  # steps between metric lines
    c.train.spike_ratio = 2.0  # skip a step whose loss exceeds this x the running mean; 0 = off
    c.train.spike_warmup = 50  # accepted steps before spike detection starts
    c.train.max_bad_steps = 5  # consecutive skipped steps that trigger a rollback
    c.train.max_rollbacks = 3  # rollbacks before the run stops with an error
    c.train.inject_nan_at = ()  # n-th batches drawn that are poisoned with NaN (fault tests)
    c.train.inject_spike_at = ()  # n-th batches drawn whose targets are scrambled (fault tests)
    c.train.inject_hang_at = 0  # the last process sleeps for good at this n-th batch (hang tests)
    c.train.hang_watchdog = True  # stop a run where no step finishes in time (jaxlm/hang.py)
    c.train.hang_factor = 10.0  # ... in this many times the median recent step time
    c.train.hang_min_s = 600.0  # ... and at least this many seconds (a later stage may compile)
    c.train.hang_slow_s = 3600.0  # extra seconds while a checkpoint saves or an evaluation runs

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 200  # steps between held-out evaluations; 0 = only at the end
    c.eval.max_batches = 0  # cap on batches per dataset in periodic evals (the final eval is whole)
    c.eval.batch_size = 0  # global eval batch in sequences; 0 = train.batch_size
    c.eval.next_line_examples = 200  # built-in "which is the real next line" task size; 0 = off
    c.eval.task_files = ""  # extra multiple-choice tasks: comma-separated JSONL paths
    c.eval.retrieval_lengths = ""  # passkey retrieval scored at these lengths, e.g. "256,1024"
    c.eval.retrieval_examples = 50  # examples per retrieval length

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 200  # steps between checkpoints (and one at the end)
    c.checkpoint.keep = 3  # newest checkpoints kept
    c.checkpoint.keep_every = 0  # also keep every k-th step forever; 0 = none
    c.checkpoint.async_save = True  # write in a background thread
    # The fast local tier (docs/reliability.md): each host's own shards, synchronously, every
    # local_every steps (0 = off) to local_dir/<run id>/process_<i> (RAM by default: a restart
    # on the same hosts loses at most local_every steps; other hosts resume from `every`'s).
    c.checkpoint.local_every = 0
    c.checkpoint.local_dir = "/dev/shm/jaxlm"  # a host-local directory, never a shared one

    c.mesh = ml_collections.ConfigDict()
    c.mesh.preset = "fsdp"  # dp | fsdp | fsdp_tp | ep_fsdp | cp_fsdp | cp_fsdp_tp (sharding.py)
    # (data, fsdp, tensor) sizes, or (data, fsdp, tensor, context) with a cp_* preset; -1 = the
    # remaining devices.
    c.mesh.shape = (1, -1, 1)
    c.mesh.multihost = False  # call jax.distributed.initialize() (TPU pods, SLURM)
    c.mesh.coordinator = ""  # explicit coordinator host:port for jax.distributed
    c.mesh.num_processes = 1  # with coordinator: number of processes
    c.mesh.process_id = 0  # with coordinator: this process's index

    c.logging = ml_collections.ConfigDict()
    c.logging.tensorboard = True  # write TensorBoard events under <workdir>/tb
    c.logging.wandb = False  # log to Weights & Biases (pip install 'jaxlm[wandb]')
    c.logging.wandb_project = "jaxlm"  # W&B project
    c.logging.wandb_mode = "offline"  # online | offline (offline needs no network)

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = "def fibonacci(n):\n"  # continued at the end of training
    c.sample.max_tokens = 64  # new tokens to sample
    c.sample.temperature = 0.0  # 0 = greedy
    c.sample.top_k = 0  # keep the k most likely tokens; 0 = all
    c.sample.top_p = 1.0  # nucleus sampling mass; 1 = off
    return c
