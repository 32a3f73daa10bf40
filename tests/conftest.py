import os

# See memoe_fast/cli.py: sleeping, not spinning, OpenMP threads (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from memoe_fast.testing import shared_data_path


def pytest_configure(config):
    config.addinivalue_line("markers", "interpret: runs Triton kernels (under TRITON_INTERPRET=1 on CPU)")
    config.addinivalue_line("markers", "slow: loads the embedded real model")


@pytest.fixture
def shared_data():
    """Returns a function giving a path in ../shared/data, skipping the test with a reason when absent."""

    def get(name: str) -> str:
        path = shared_data_path(name)
        if path is None:
            pytest.skip(f"{name} not found in ../shared/data (the shared data sets are not shipped with the project)")
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
