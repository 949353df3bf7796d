"""Test setup: eight fake CPU devices, set before anything imports jax.

Every test and every jaxlm process a test starts share one persistent XLA compilation cache,
deleted at exit: most tests build the same tiny models, and on a 2-core CPU compiling them again
in each process was a third of the suite's time. A cached executable is the one the compiler
produced, so results are unchanged.

Fixtures more than one test module uses live here (their builders in tests/helpers.py): test
modules never import from one another.
"""

import atexit
import os
import shutil
import tempfile
import time

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="jaxlm-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# --------------------------------------------------------------------------- shared fixtures
# (imports inside each fixture: this module must set the flags above before jax loads)


@pytest.fixture
def no_home_cache(tmp_path, monkeypatch):
    """JAXLM_CACHE points into the test's tmp_path, never at ~/.cache/jaxlm."""
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "env_cache"))


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
    """A folder `code/` of 60 real stdlib files plus one exact copy (which curation removes)."""
    from tests.helpers import copy_stdlib_subset

    root = tmp_path_factory.mktemp("corpus")
    names = copy_stdlib_subset(root / "code", 17, 0, 60)
    shutil.copyfile(root / "code" / names[3], root / "code" / "zz_exact_copy.py")
    return root


@pytest.fixture(scope="module")
def stdlib_prepared(stdlib_corpus, tmp_path_factory):
    """`prepare` run on stdlib_corpus: (manifest path, data cfg, tokenizer cfg, log, seconds)."""
    from jaxlm.data import prepare
    from tests.helpers import Log, data_configs

    cache = tmp_path_factory.mktemp("cache")
    data_cfg, tok_cfg = data_configs(str(stdlib_corpus / "code"), cache)
    log = Log()
    t = time.perf_counter()
    path = prepare.prepare(data_cfg, tok_cfg, log=log)
    return path, data_cfg, tok_cfg, log, time.perf_counter() - t


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """(HF model dir, torch model, tokenizers.Tokenizer): a tiny random Llama with a byte-level
    BPE tokenizer of BPE_VOCAB pieces."""
    from tests.helpers import BPE_VOCAB, make_hf_model, write_bpe_tokenizer

    path = tmp_path_factory.mktemp("hf")
    tok = write_bpe_tokenizer(str(path))
    assert tok.get_vocab_size() == BPE_VOCAB
    model = make_hf_model(path, vocab=BPE_VOCAB, bos_token_id=1, eos_token_id=2)
    return str(path), model, tok
