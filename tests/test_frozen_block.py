"""The frozen LLaMA block as one autograd node: the module's output and input gradient, on a packed row."""
import pytest
import torch

from memoe_fast.editing.frozen_block import FrozenBlocks, supported
from memoe_fast.editing.packing import pack_block_inputs, packed_attention, attention_configs
from memoe_fast.metrics import Batch


def _llama(bias: bool, kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, attention_bias=bias, mlp_bias=bias)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def _packed_inputs(model, lengths):
    """Block 1's captured inputs for a right-padded batch of ``lengths``, packed into one row."""
    n, length = len(lengths), max(lengths)
    mask = (torch.arange(length) < torch.tensor(lengths).unsqueeze(1)).long()
    ids = torch.randint(4, 300, (n, length)) * mask
    store = {}

    def hook(_m, args, kwargs):
        store["a"], store["k"] = args, kwargs
        raise RuntimeError("captured")

    h = model.model.layers[1].register_forward_pre_hook(hook, with_kwargs=True)
    with pytest.raises(RuntimeError, match="captured"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    h.remove()
    batch = Batch(ids, mask, torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, 1, dtype=torch.long),
                  torch.ones(n, 1, dtype=torch.bool))
    args, kwargs, packed = pack_block_inputs(store["a"], store["k"], batch)
    return args, {**kwargs, "memoe_packed": packed}


@pytest.mark.parametrize("bias,kv_heads", [(False, 4), (False, 2), (True, 1)])
def test_output_and_input_gradient_match_the_module(bias, kv_heads):
    model = _llama(bias, kv_heads)
    block = model.model.layers[1]
    assert supported(block)
    args, kwargs = _packed_inputs(model, [5, 9, 3, 7])
    x = torch.randn_like(args[0]) * 3
    cot = torch.randn_like(x)
    runner = FrozenBlocks(kwargs)
    with packed_attention(attention_configs([block])):
        xa = x.clone().requires_grad_()
        want = block(xa, *args[1:], **kwargs)
        want = want[0] if isinstance(want, tuple) else want
        want.backward(cot)
    xb = x.clone().requires_grad_()
    got = runner(block, xb)
    got.backward(cot)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in block.parameters())


def test_other_layouts_are_not_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2))
    assert not supported(gpt2.transformer.h[0])
    llama = _llama(False, 4)
    llama.model.layers[0].mlp.act_fn = torch.nn.GELU()
    assert not supported(llama.model.layers[0]), "only a SiLU-gated MLP has the written-out backward"
