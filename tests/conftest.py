"""Process-wide settings for the whole suite, made here once, before any test module is imported.

Settings that a library reads when it loads must not depend on which test file pytest imports
first (the suite runs in any file order: see ``--file-order`` below and .ci/run).
"""
import os
import random
import sys

# See memoe_fast/cli.py: sleeping, not spinning, OpenMP threads (set before torch loads OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

assert "triton" not in sys.modules and "bitsandbytes" not in sys.modules, (
    "triton or bitsandbytes was imported before tests/conftest.py set TRITON_INTERPRET"
)
import torch  # noqa: E402  (importing torch does not import triton; bitsandbytes does)

if not torch.cuda.is_available():
    # Without CUDA the Triton kernels run under the interpreter, which triton reads when it loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")
assert "triton" not in sys.modules, "importing torch imported triton before TRITON_INTERPRET was set"

import pytest  # noqa: E402

from memoe_fast.testing import require, shared_data_dir, shared_data_path  # noqa: E402

FILE_ORDERS = ("default", "reverse", "random")


def pytest_addoption(parser):
    group = parser.getgroup("memoe-fast")
    group.addoption("--file-order", choices=FILE_ORDERS, default="default",
                    help="run the test files in reverse or random order (random also shuffles the tests "
                         "inside each file): the suite must not depend on its order")
    group.addoption("--order-seed", type=int, default=None,
                    help="seed of --file-order=random (default: a fresh one, printed in the header)")


def _order_seed(config) -> int:
    if not hasattr(config, "_memoe_order_seed"):
        seed = config.getoption("--order-seed")
        config._memoe_order_seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    return config._memoe_order_seed


def pytest_report_header(config):
    order = config.getoption("--file-order")
    if order == "random":
        return f"file order: random (--order-seed={_order_seed(config)} repeats it)"
    return f"file order: {order}"


def pytest_collection_modifyitems(session, config, items):
    order = config.getoption("--file-order")
    if order == "default":
        return
    groups: dict = {}
    for item in items:
        groups.setdefault(str(item.path), []).append(item)
    files = list(groups)
    if order == "reverse":
        files.reverse()
    else:
        rng = random.Random(_order_seed(config))
        rng.shuffle(files)
        for f in files:
            rng.shuffle(groups[f])
    items[:] = [item for f in files for item in groups[f]]


def pytest_configure(config):
    config.addinivalue_line("markers", "interpret: runs Triton kernels (under TRITON_INTERPRET=1 on CPU)")
    config.addinivalue_line("markers", "slow: loads the embedded real model")


@pytest.fixture
def shared_data():
    """Returns a function giving a path in ../shared/data. When the file is absent the test skips with a
    reason, or under ``CI=true`` fails naming the file (see :func:`memoe_fast.testing.require`)."""

    def get(name: str) -> str:
        path = shared_data_path(name)
        require(path is not None, f"{name} in the shared data folder {shared_data_dir()} (../shared/data beside "
                                  "the checkout; the data sets are not shipped with the project)")
        return path

    return get


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct and its tokenizer (converted from its GGUF once, then cached)."""
    from memoe_fast.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(embedded):
    return embedded[1]


def _tiny(arch: str, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=vocab, n_embd=48, n_layer=4, n_head=4, n_positions=128,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    return model.eval()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request, tokenizer):
    """A tiny random LLaMA or GPT-2 sharing the embedded tokenizer's vocabulary."""
    return _tiny(request.param, len(tokenizer))
