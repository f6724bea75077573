"""Test set-up: 8 simulated CPU devices (so sharding is exercised), tiny HF checkpoints."""

import os

# XLA:CPU's backend (LLVM) optimisation level 0: the same XLA programs, machine code optimised less, which
# takes about a quarter less time to compile; the tests' programs are tiny, so compiling dominates their time.
# Subprocesses the tests start inherit both flags.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

from hf_checkpoints import FAMILIES, make_hf_checkpoint  # noqa: E402


def pytest_sessionstart(session):
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices (set before jax is imported)"


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(name)`` -> directory of a tiny random HF checkpoint (built once per session)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = make_hf_checkpoint(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def isolated_datasets_cache(tmp_path, monkeypatch):
    """Keep ``datasets``' Arrow cache for test files out of the user's home cache (and out of other tests')."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tests' tiny character-level tokenizer, loaded with ``transformers``."""
    import transformers

    from hf_checkpoints import make_tokenizer

    return transformers.AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def module_xla_cache(tmp_path_factory):
    """JAX's persistent cache while the module's tests run: a run that builds a program an earlier run compiled
    (each ``run_sft`` / ``run_rl`` jits its own functions) loads it instead of compiling it again. The modules
    that use it share one folder (per test process), so identical programs of several modules compile once."""
    from sftrl_jax.jitted import compilation_cache

    with compilation_cache(tmp_path_factory.getbasetemp() / "xla_cache"):
        yield
