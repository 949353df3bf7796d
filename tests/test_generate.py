"""Sampling rules and the generate tool.

(Cached greedy decoding equal to the full forward pass lives in test_model.py.) Here: top-k 1 and
a tiny top-p reduce to greedy, top-k and top-p never draw a token outside their set, EOS ends one
row while the others go on, seeded sampling is reproducible, and `tools/generate.py` continues a
prompt from a real checkpoint in a workdir.
"""

import io
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm import checkpoint, cli, generate, infill, model, objectives, sharding, train
from jaxlm import spec as run_spec
from jaxlm.errors import TokenizerMismatch
from jaxlm.evaluate import trained as trained_lib
from tests.helpers import tiny_config
from tools import generate as generate_tool


def run_generate(argv: list[str]) -> int:
    """`python tools/generate.py ARGV` in this process; its exit status."""
    return cli.call(generate_tool.main, generate_tool.FLAGS, argv)


CFG = model.ModelConfig(
    vocab_size=67,
    d_model=29,
    n_layers=2,
    n_heads=6,
    n_kv_heads=3,
    head_dim=6,
    d_ff=37,
    max_seq_len=64,
    init_std=0.3,
)
N_NEW = 9


def numpy_params(abstract_params, std, seed):
    """Weights drawn by numpy, shaped like `abstract_params`: no JAX random-init compilation."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(
        lambda x: (
            np.ones(x.shape, np.float32)
            if x.ndim == 1  # norm scales
            else (std * rng.randn(*x.shape)).astype(np.float32)
        ),
        abstract_params,
    )


@pytest.fixture(scope="module")
def net():
    graphdef, abstract = nnx.split(model.abstract(CFG))
    return graphdef, numpy_params(nnx.to_pure_dict(abstract), CFG.init_std, seed=5)


def prompts(seed):
    """Two prompts of lengths 6 and 4 (one batch shape, so every call reuses one compilation)."""
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 67, 6).tolist(), rng.randint(0, 67, 4).tolist()]


def sample(net, prompt_ids, **kw):
    kw.setdefault("eos_id", -1)
    return generate.generate(*net, prompt_ids, max_new_tokens=N_NEW, **kw)


def test_top_k_one_decodes_greedily(net):
    greedy = sample(net, prompts(0))
    assert all(len(row) == N_NEW for row in greedy)
    assert sample(net, prompts(0), temperature=1.0, top_k=1, seed=3) == greedy


def test_top_k_and_top_p_only_ever_draw_allowed_tokens():
    rng = np.random.RandomState(0)
    logits = np.tile(3 * rng.randn(16, 67).astype(np.float32), (50, 1))  # (800, V): 50 draws a row
    draw = jax.jit(generate.sample_logits, static_argnums=(2, 3, 4))
    key = jax.random.key(1)
    greedy = logits.argmax(-1)
    np.testing.assert_array_equal(draw(logits, key, 1.0, 1, 1.0), greedy)  # top-k 1
    np.testing.assert_array_equal(draw(logits, key, 1.0, 0, 1e-6), greedy)  # tiny top-p

    order = np.argsort(-logits, axis=-1)
    rank = lambda tokens: np.argmax(order == np.asarray(tokens)[:, None], axis=-1)  # noqa: E731
    top3 = rank(draw(logits, key, 1.0, 3, 1.0))
    assert top3.max() == 2 and top3.min() == 0  # within the 3 best, and not only the best
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = np.take_along_axis(probs / probs.sum(-1, keepdims=True), order, axis=-1)  # descending
    mass_before = np.cumsum(probs, axis=-1) - probs
    nucleus = rank(draw(logits, key, 1.0, 0, 0.5))
    assert (mass_before[np.arange(len(nucleus)), nucleus] < 0.5).all()
    assert nucleus.max() > 0


def test_temperature_sampling_is_reproducible_and_depends_on_the_seed(net):
    a = sample(net, prompts(0), temperature=1.0, seed=11)
    assert sample(net, prompts(0), temperature=1.0, seed=11) == a
    assert sample(net, prompts(0), temperature=1.0, seed=12) != a
    assert a != sample(net, prompts(0))  # sampling at temperature 1 is not greedy here


def test_eos_stops_one_row_while_the_other_continues(net):
    # Choose, as EOS, a token that row 0 emits mid-way and row 1 never does.
    for seed in range(50):
        p = prompts(seed)
        row0, row1 = sample(net, p)
        cut = next(
            (j for j in range(1, N_NEW) if row0[j] not in row0[:j] and row0[j] not in row1), None
        )
        if cut is not None:
            break
    else:
        pytest.fail("no prompt gave a usable EOS candidate")
    stopped = sample(net, p, eos_id=row0[cut])
    assert stopped == [row0[:cut], row1]


# --------------------------------------------------------------------------- the tool


def char_tokenizer(path, text="abcdefgh ijklmnop the quick brown fox", pieces=()):
    """A sentencepiece char model (pad 0, unk 1, bos 2, eos 3) over a few letters, plus
    `pieces` as whole symbols."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        user_defined_symbols=list(pieces),
        sentence_iterator=iter([text] * 40),
        model_writer=buf,
        model_type="char",
        vocab_size=26,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    from jaxlm.data import tokenizer

    return tokenizer.load(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory as train.run leaves it: config.json, tokenizer.model, a checkpoint."""
    return _workdir(tmp_path_factory)


def _workdir(tmp_path_factory, pieces=()):
    wd = tmp_path_factory.mktemp("run")
    tok = char_tokenizer(str(wd / "tokenizer.model"), pieces=pieces)
    config = tiny_config()
    config.sample.max_tokens = 7
    (wd / "config.json").write_text(config.to_json_best_effort(indent=2))
    setup = train.Setup(run_spec.build(config), tok.vocab_size, sharding.make_mesh((1, -1, 1)))
    params = numpy_params(setup.abstract_state["params"], 0.3, seed=6)
    params = jax.device_put(params, setup.param_shardings)
    state = {"params": params, "opt_state": setup.tx.init(params), "step": np.int32(5)}
    meta = {
        "config": json.loads(config.to_json_best_effort()),
        "tokenizer_sha256": tok.sha256,
        "param_shapes": checkpoint.param_shapes(state["params"]),
    }
    ckpt = checkpoint.Checkpointer(str(wd / "checkpoints"), config.checkpoint)
    ckpt.save(5, state, None, meta)
    ckpt.close()
    return wd, setup, state["params"], tok


def test_generate_tool_continues_the_prompt_with_the_checkpointed_model(workdir, capsys):
    wd, setup, params, tok = workdir
    assert run_generate([f"--workdir={wd}", "--prompt=the q"]) == 0
    out = capsys.readouterr().out
    expected = generate.generate(
        setup.graphdef,
        params,
        [[tok.bos_id, *tok.encode("the q")]],
        max_new_tokens=7,
        eos_id=tok.eos_id,
    )[0]  # max_tokens from config.sample
    assert out == "the q" + tok.decode(expected) + "\n"


def test_load_trained_restores_the_saved_params_exactly(workdir):
    wd, setup, params, _ = workdir
    trained = trained_lib.load_trained(str(wd))
    assert trained.step == 5 and trained.config.sample.max_tokens == 7
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert trained.params["embed"].sharding == setup.param_shardings["embed"]


def test_a_different_tokenizer_is_refused(workdir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(workdir[0], other)
    char_tokenizer(str(other / "tokenizer.model"), text="zyxwvu tsrq")
    with pytest.raises(TokenizerMismatch, match="does not match the tokenizer checkpoint 5 was"):
        trained_lib.load_trained(str(other))


def test_generate_tool_errors_are_one_line(workdir, tmp_path, capsys):
    wd = workdir[0]
    assert run_generate([f"--workdir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: no checkpoint in {tmp_path}/checkpoints;") and err.count("\n") == 1
    )
    assert run_generate([f"--workdir={wd}", "--step=4"]) == 1
    assert capsys.readouterr().err.startswith("error: no checkpoint at step 4 in ")
    assert run_generate([f"--workdir={wd}", "--max_tokens=70"]) == 1
    assert "exceeds the model's max_seq_len=64" in capsys.readouterr().err


@pytest.fixture(scope="module")
def infill_workdir(tmp_path_factory):
    """A run whose tokenizer has the [MASK] piece and the FIM sentinels."""
    return _workdir(tmp_path_factory, pieces=(objectives.MASK_PIECE, *objectives.FIM_PIECES))


def test_fill_middle_continues_the_psm_prompt_the_pipeline_trains_on(infill_workdir, capsys):
    wd, setup, params, tok = infill_workdir
    args = [f"--workdir={wd}", "--fill_middle", "--prompt=the q", "--suffix=k brown"]
    assert run_generate(args) == 0
    out = capsys.readouterr().out
    pre, mid, suf = (tok.piece_to_id(p) for p in objectives.FIM_PIECES)
    ids = [tok.bos_id, pre, *tok.encode("the q"), suf, *tok.encode("k brown"), mid]
    assert infill.middle_prompt(tok, "the q", "k brown") == ids
    new = generate.generate(setup.graphdef, params, [ids], max_new_tokens=7, eos_id=tok.eos_id)
    middle = tok.decode(new[0])
    assert out == f"the q{middle}k brown\nmiddle: {middle!r}\n"


def test_fill_mask_reads_the_text_after_the_mask(infill_workdir):
    trained = trained_lib.load_trained(str(infill_workdir[0]))
    filled, top = infill.fill_mask(trained, "ab[MASK]defgh")
    _, other = infill.fill_mask(trained, "ab[MASK]dhgfe")  # only the text after the mask differs
    assert len(top) == 1 and len(top[0]) == 5
    assert filled == "ab" + top[0][0][0] + "defgh"
    assert top[0] != other[0]  # bidirectional: the prediction sees what follows it


def test_fill_flags_on_a_run_without_the_pieces_are_one_error_line(workdir, capsys):
    assert run_generate([f"--workdir={workdir[0]}", "--fill_mask", "--prompt=a"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --fill_mask needs the piece '[MASK]'") and err.count("\n") == 1
