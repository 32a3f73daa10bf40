"""Editors end to end: fast vs reference, implementations vs each other, and a real edit of the embedded model."""
import pytest
import torch

from memoe_fast import MEMoEConfig
from memoe_fast.datasets import EditRequest, load_demo
from memoe_fast.editing.editor import MEMoEEditor
from memoe_fast.editing.fast_editor import FastMEMoEEditor
from memoe_fast.integration import transformer_blocks
from memoe_fast.testing import assert_same_training, reloaded, require_module

TINY_REQUESTS = [
    EditRequest("The capital of France is", "Rome", "France", ["France's capital city is"],
                "The largest planet is", "Jupiter"),
    EditRequest("Barack Obama was born in", "Canada", "Barack Obama", ["The birthplace of Barack Obama is"],
                "Water boils at", "100 degrees"),
    EditRequest("Apple was founded by", "Bill Gates", "Apple", ["The founder of Apple is"],
                "The Eiffel Tower is in", "Paris"),
]


def _losses(model, tokenizer, editor_cls, impl="reference", steps=4, layer=2, requests=TINY_REQUESTS, **kw):
    cfg = MEMoEConfig(layer=layer, steps=steps, lr=1e-2, impl=impl, gate_noise=0.0, **kw)
    editor = editor_cls(model, tokenizer, cfg)
    try:
        return editor.train(requests)
    finally:
        editor.handle.remove()


@pytest.mark.parametrize("layer", [0, 2, 3])  # first block (no frozen prefix), middle, last (no upper blocks)
def test_fast_editor_matches_reference_step_by_step(tiny_model, tokenizer, layer):
    ref = _losses(tiny_model, tokenizer, MEMoEEditor, layer=layer)
    fast = _losses(tiny_model, tokenizer, FastMEMoEEditor, layer=layer)
    assert ref[-1] < ref[0], "training must lower the loss"
    assert_same_training("fast", fast, ref)


def test_fast_editor_micro_batches_accumulate_like_one_batch(tiny_model, tokenizer):
    # The balance loss is a per-forward statistic (and counts pad tokens), so it is off here.
    cfg = MEMoEConfig(layer=1, steps=3, lr=1e-2, impl="reference", aux_loss_weight=0.0)
    whole = FastMEMoEEditor(tiny_model, tokenizer, cfg, micro_batch=64)
    a = whole.train(TINY_REQUESTS)
    whole.handle.remove()
    split = FastMEMoEEditor(tiny_model, tokenizer, cfg, micro_batch=1)
    b = split.train(TINY_REQUESTS)
    split.handle.remove()
    assert_same_training("micro_batch=1", b, a)
    padded = FastMEMoEEditor(tiny_model, tokenizer, cfg, micro_batch=64, pack=False)
    c = padded.train(TINY_REQUESTS)
    padded.handle.remove()
    assert_same_training("pack=False", c, a)


def test_packing_drops_the_padding(tiny_model, tokenizer):
    editor = FastMEMoEEditor(tiny_model, tokenizer, MEMoEConfig(layer=1, steps=1, impl="torch"))
    _, prefix = _trained_prefix(editor)
    real = int(sum(len(p) + len(t) for p, t in _pairs(tokenizer)))
    # Neither padding nor any sequence's last token (it predicts nothing scored) is ever computed.
    kept = real - len(TINY_REQUESTS)
    assert int(prefix.sub.attention_mask.sum()) == kept < prefix.sub.attention_mask.numel()
    assert prefix.packed is not None and prefix.packed.token_seq.numel() == kept
    assert prefix.args[0].shape[:2] == (1, kept)
    # Pre-norm blocks add the MLP's output to the rest: the edited block's frozen part is cached too.
    assert prefix.mlp_in is not None and prefix.base_out.shape[:2] == (1, kept)
    assert prefix.rows.numel() == sum(len(t) for _, t in _pairs(tokenizer))
    # The attention of the packed row runs per sequence on the padded layout.
    assert prefix.kwargs.get("memoe_packed") is prefix.packed
    # LLaMA-style blocks: the last block runs at the target rows only, the others as one autograd node
    # each (GPT-2 blocks run whole, as the module's own ops).
    llama = hasattr(transformer_blocks(tiny_model)[-1], "self_attn")
    assert prefix.last_at_rows == llama
    assert (prefix.fused is not None) == llama


def _trained_prefix(editor):
    """Train on TINY_REQUESTS; the losses and the one micro-batch's cached prefix (``finish`` frees it)."""
    kept = {}
    finish = editor.finish

    def keep():
        kept["prefix"] = dict(editor._prefix)
        finish()

    editor.finish = keep
    losses = editor.train(TINY_REQUESTS)
    (_, chunks), = kept["prefix"].values()
    (prefix, _, _), = chunks
    assert not editor._prefix, "finish() must free the cached prefix"
    return losses, prefix


def _pairs(tokenizer):
    from memoe_fast.metrics import encode_pair

    return [encode_pair(tokenizer, r.prompt, r.target) for r in TINY_REQUESTS]


def test_edited_block_split_falls_back_when_the_block_is_not_additive(tiny_model, tokenizer):
    """A block whose output is not ``rest + mlp(...)`` (a post-norm block, say: here a tanh on the
    block's output) must run whole in every step, and the losses must still be the reference's."""
    block = transformer_blocks(tiny_model)[2]
    plain = type(block).forward

    def squashed(self, *args, **kwargs):
        out = plain(self, *args, **kwargs)
        return (torch.tanh(out[0]), *out[1:]) if isinstance(out, tuple) else torch.tanh(out)

    block.forward = squashed.__get__(block)
    try:
        ref = _losses(tiny_model, tokenizer, MEMoEEditor)
        cfg = MEMoEConfig(layer=2, steps=4, lr=1e-2, impl="reference", gate_noise=0.0)
        editor = FastMEMoEEditor(tiny_model, tokenizer, cfg)
        try:
            fast, prefix = _trained_prefix(editor)
        finally:
            editor.handle.remove()
    finally:
        del block.forward
    assert prefix.mlp_in is None and prefix.base_out is None
    assert_same_training("fast, whole block", fast, ref)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_implementations_give_the_same_losses(tiny_model, tokenizer, impl):
    if impl == "triton":
        require_module("triton", "the fused kernels")
    ref = _losses(tiny_model, tokenizer, FastMEMoEEditor, impl="reference", steps=3)
    other = _losses(tiny_model, tokenizer, FastMEMoEEditor, impl=impl, steps=3)
    assert_same_training(impl, other, ref)


def test_sequential_editing_reports_each_batch(tiny_model, tokenizer):
    """Each batch's metrics are measured right after it trains, its Locality against the unedited
    model's tokens of that batch's own locality prompts; the final metrics against the whole set's."""
    from memoe_fast.metrics import evaluate, locality_tokens

    cfg = MEMoEConfig(layer=1, steps=3, lr=1e-2, impl="torch")
    editor = FastMEMoEEditor(tiny_model, tokenizer, cfg)
    unedited = [locality_tokens(tiny_model, tokenizer, [r]) for r in TINY_REQUESTS]
    # Each request's unedited locality tokens differ from every other's: measured against another
    # request's tokens, a batch's Locality would not come out as it should.
    assert len({tuple(t[0].tolist()) for t in unedited}) == len(TINY_REQUESTS)
    expected = []
    train = editor.train

    def train_then_measure(reqs, desc="", **kw):
        losses = train(reqs, desc, **kw)
        chunk = reqs  # no replay: the batch itself
        pre = [t for r in chunk for t in unedited[TINY_REQUESTS.index(r)]]
        m = evaluate(tiny_model, tokenizer, chunk, editor.handle, pre_locality=pre)
        expected.append({k: m[k] for k in ("reliability", "generality", "locality")})
        return losses

    editor.train = train_then_measure
    result = editor.edit(TINY_REQUESTS, mode="sequential", batch_size=2)
    assert [b["n"] for b in result["per_batch"]] == [2, 1]
    assert [{k: b[k] for k in ("reliability", "generality", "locality")} for b in result["per_batch"]] == expected
    assert len(result["losses"]) == 2 and all(len(losses) == 3 for losses in result["losses"])
    # Before: the unedited model against itself; after: the edited model against the unedited tokens.
    pre_loc = [t for u in unedited for t in u]
    with editor.handle.disabled():
        assert result["pre"] == evaluate(tiny_model, tokenizer, TINY_REQUESTS, editor.handle, pre_locality=pre_loc)
    assert result["post"] == evaluate(tiny_model, tokenizer, TINY_REQUESTS, editor.handle, pre_locality=pre_loc)
    # The locality prompts name no edited subject: out of the anchor scope, their tokens are the unedited ones.
    assert [b["locality"] for b in result["per_batch"]] == [1.0, 1.0] and result["post"]["locality"] == 1.0
    assert result["post"]["reliability"] > result["pre"]["reliability"]
    with pytest.raises(ValueError, match="batch_size"):
        editor.edit(TINY_REQUESTS, mode="sequential")
    with pytest.raises(ValueError, match="mode"):
        editor.edit(TINY_REQUESTS, mode="parallel")


@pytest.mark.slow
def test_real_model_edits_take(embedded):
    """Edit the embedded SmolLM2 on a few demo facts: the edits take, unrelated prompts stay."""
    model, tokenizer = embedded
    requests = load_demo(6)
    editor = FastMEMoEEditor(model, tokenizer, MEMoEConfig())
    try:
        result = editor.edit(requests)
        assert result["pre"]["reliability"] < 0.5
        assert result["post"]["reliability"] >= 0.9
        # The demo's locality prompts name no edited subject: with the anchor scope the experts never see
        # them, so every locality token is the unedited model's.
        assert result["post"]["locality"] == 1.0
        # The edited model says the new fact when asked with generate() and no subject given.
        req = requests[0]
        enc = tokenizer(req.prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:])
        assert text.strip().startswith(req.target.split()[0]), text
    finally:
        editor.handle.remove()


def test_fast_editor_evaluates_like_the_reference(tiny_model, tokenizer):
    """Target-only logits must equal the full model's logits at the target positions."""
    from memoe_fast.metrics import collate, encode_pair, evaluate, target_logits

    editor = FastMEMoEEditor(tiny_model, tokenizer, MEMoEConfig(layer=1, steps=3, lr=1e-2, impl="torch"))
    editor.train(TINY_REQUESTS)
    batch = collate([encode_pair(tokenizer, r.prompt, r.target) for r in TINY_REQUESTS], tokenizer.pad_token_id)
    prompts = [r.prompt for r in TINY_REQUESTS]
    with torch.no_grad(), editor.handle.anchored(prompts):
        fast = editor.eval_logits_fn()(batch)
        full = target_logits(tiny_model, batch)
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-4)
    fast_metrics = editor.evaluate(TINY_REQUESTS)
    ref_metrics = evaluate(tiny_model, tokenizer, TINY_REQUESTS, editor.handle)
    assert fast_metrics["per_example"] == ref_metrics["per_example"]


def test_gate_without_a_gradient_is_not_trained(tiny_model, tokenizer):
    """Top-1 renormalised routing without a balance loss gives the gate no gradient but rounding noise;
    Adam would blow that noise up into full-size steps, so the gate must stay as initialised."""
    editor = FastMEMoEEditor(tiny_model, tokenizer, MEMoEConfig(layer=1, steps=3, lr=1e-2, impl="torch"))
    before = editor.handle.bypass.w_gate.detach().clone()
    editor.train(TINY_REQUESTS)
    assert torch.equal(editor.handle.bypass.w_gate, before)
    editor.handle.remove()
    learning = FastMEMoEEditor(tiny_model, tokenizer, MEMoEConfig(layer=1, steps=3, lr=1e-2, impl="torch", top_k=2))
    before = learning.handle.bypass.w_gate.detach().clone()
    learning.train(TINY_REQUESTS)
    assert not torch.equal(learning.handle.bypass.w_gate, before)


def test_sequential_replay_trains_on_earlier_edits(tiny_model, tokenizer):
    editor = FastMEMoEEditor(tiny_model, tokenizer, MEMoEConfig(layer=1, steps=1, impl="torch", replay=True))
    seen = []
    train = editor.train
    editor.train = lambda reqs, desc="", **kw: (seen.append([r.subject for r in reqs]), train(reqs, desc, **kw))[1]
    editor.edit(TINY_REQUESTS, mode="sequential", batch_size=2, evaluate=False)
    assert seen == [["France", "Barack Obama"], ["France", "Barack Obama", "Apple"]]


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)  # the one-node blocks are for LLaMA-style blocks
def test_one_node_blocks_are_not_used_where_the_module_computes_something_else(tiny_model, tokenizer):
    """The upper blocks run as one autograd node only after their output and gradient were checked:
    where the attention computes something else (a subclass that triples its output), in the checked
    block or in another one, the blocks must run as themselves and the losses stay the reference's."""
    blocks = transformer_blocks(tiny_model)
    plain = type(blocks[0].self_attn)

    class Squashed(plain):
        def forward(self, *args, **kwargs):
            out, weights = super().forward(*args, **kwargs)
            return 3.0 * out, weights

    ref_plain = _losses(tiny_model, tokenizer, MEMoEEditor, layer=0)
    for i in (1, 2):  # the checked (first upper) block, then another upper block
        blocks[i].self_attn.__class__ = Squashed
        try:
            ref = _losses(tiny_model, tokenizer, MEMoEEditor, layer=0)
            editor = FastMEMoEEditor(tiny_model, tokenizer, MEMoEConfig(layer=0, steps=4, lr=1e-2, impl="reference",
                                                                        gate_noise=0.0))
            try:
                fast, prefix = _trained_prefix(editor)
            finally:
                editor.handle.remove()
        finally:
            blocks[i].self_attn.__class__ = plain
        assert ref != pytest.approx(ref_plain), "the squashed attention must change the function"
        assert prefix.fused is None
        assert_same_training(f"fast, block {i} squashed", fast, ref)


# Three edits of equal token length: no padding, so the balance loss (a statistic over the forward's
# tokens) is over the same tokens in the reference editor's padded batch and the fast editor's packed row.
EQUAL_LENGTH_REQUESTS = [
    EditRequest("The capital of France is", "Rome", "France", ["France's capital city is"], "Water boils at", "100"),
    EditRequest("The capital of Spain is", "Berlin", "Spain", ["Spain's capital city is"], "Grass is", "green"),
    EditRequest("Apple was founded by", "Bill Gates", "Apple", ["The founder of Apple is"], "The sky is", "blue"),
]


def test_fast_editor_trains_the_balance_loss_like_the_reference(tiny_model, tokenizer):
    """The paper's setting: a balance loss (``aux_loss_weight > 0``) with top-1 routing, the gate's only
    gradient. The fast editor must add it to its loss and train the gate by it as the reference does."""
    from memoe_fast.metrics import encode_pair

    lengths = {sum(map(len, encode_pair(tokenizer, r.prompt, r.target))) for r in EQUAL_LENGTH_REQUESTS}
    assert len(lengths) == 1, f"the requests must be of equal length, got {lengths}"
    runs, gates = {}, {}
    for name, cls in (("reference", MEMoEEditor), ("fast", FastMEMoEEditor)):
        cfg = MEMoEConfig(layer=1, steps=4, lr=1e-2, impl="reference", aux_loss_weight=0.5, anchor_scope=False)
        editor = cls(tiny_model, tokenizer, cfg)
        before = editor.handle.bypass.w_gate.detach().clone()
        try:
            runs[name] = editor.train(EQUAL_LENGTH_REQUESTS)
            gates[name] = editor.handle.bypass.w_gate.detach().clone()
        finally:
            editor.handle.remove()
        assert not torch.equal(gates[name], before), f"{name}: the balance loss must train the gate"
    assert_same_training("fast with a balance loss", runs["fast"], runs["reference"])
    torch.testing.assert_close(gates["fast"], gates["reference"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layer", [0, 2])
def test_activation_checkpointing_computes_the_same_steps(tiny_model, tokenizer, layer):
    """``checkpoint=True`` recomputes the upper blocks in backward; the blocks must get the same extra
    arguments (attention mask, rotary embeddings, packing) in both passes."""
    ref = _losses(tiny_model, tokenizer, MEMoEEditor, layer=layer)
    cfg = MEMoEConfig(layer=layer, steps=4, lr=1e-2, impl="reference", gate_noise=0.0)
    editor = FastMEMoEEditor(tiny_model, tokenizer, cfg, checkpoint=True)
    try:
        fast, prefix = _trained_prefix(editor)
    finally:
        editor.handle.remove()
    assert prefix.fused is None, "checkpointing runs the blocks as modules (no one-node blocks)"
    assert_same_training("fast, checkpoint=True", fast, ref)


def _plan(editor, requests) -> dict:
    try:
        editor.train(requests)
        return {k: d["taken"] for k, d in editor.plan.to_dict().items()}
    finally:
        editor.handle.remove()


def test_edit_plan_on_smollm2_takes_every_shortcut_that_holds(embedded):
    model, tok = embedded
    taken = _plan(FastMEMoEEditor(model, tok, MEMoEConfig(steps=1)), load_demo()[:8])
    assert taken == {"cpu_allocator_keeps_freed": True, "packed_rows": True, "packed_attention": True,
                     "cached_edited_block": True, "last_block_at_rows": True, "one_node_blocks": True,
                     # the default key span switches the experts on for the whole of a matched input
                     "suffix_only": False, "prepacked_weights": True}
    causal = MEMoEConfig(steps=1, key_span="after_match", bypass_positions="after_subject")
    assert _plan(FastMEMoEEditor(model, tok, causal), load_demo()[:8])["suffix_only"]


@pytest.mark.parametrize("tiny_model", ["gpt2"], indirect=True)
def test_edit_plan_on_gpt2_skips_the_llama_only_shortcuts(tiny_model, tokenizer):
    plan = FastMEMoEEditor(tiny_model, tokenizer, MEMoEConfig(layer=1, steps=1))
    taken = _plan(plan, TINY_REQUESTS)
    assert taken == {"cpu_allocator_keeps_freed": True, "packed_rows": True, "packed_attention": True,
                     "cached_edited_block": True, "last_block_at_rows": False, "one_node_blocks": False,
                     "suffix_only": False, "prepacked_weights": True}
    assert "not a LLaMA-style block" in plan.plan.decisions["last_block_at_rows"].reason


@pytest.mark.parametrize("tiny_model", ["llama"], indirect=True)  # GPT-2 passes its mask positionally: not packed
def test_a_batch_without_padding_is_packed_and_trains_like_the_reference(tiny_model, tokenizer):
    """One edit (or edits of equal length) has no padding, and the model then passes no attention mask;
    the fast editor still packs it (making the causal mask itself), so its shortcuts run, and trains
    the same steps as the reference."""
    single = TINY_REQUESTS[:1]
    ref = _losses(tiny_model, tokenizer, MEMoEEditor, layer=1, requests=single)
    cfg = MEMoEConfig(layer=1, steps=4, lr=1e-2, impl="reference", gate_noise=0.0)
    editor = FastMEMoEEditor(tiny_model, tokenizer, cfg)
    try:
        fast = editor.train(single)
        assert editor.plan.decisions["packed_rows"].taken and editor.plan.decisions["packed_attention"].taken
    finally:
        editor.handle.remove()
    assert_same_training("fast, one unpadded sequence", fast, ref)


def test_a_later_sequential_call_takes_new_experts_and_leaves_earlier_ones(tiny_model, tokenizer, tmp_path):
    """Lifelong editing over several calls: each call's batches get experts after the ones earlier calls'
    batches hold, so nothing an earlier call trained is retrained (before, a second call started again
    at expert 0 and overwrote the first call's first batch)."""
    cfg = MEMoEConfig(layer=1, steps=2, lr=1e-2, impl="torch", gate_noise=0.0)
    editor = FastMEMoEEditor(tiny_model, tokenizer, cfg)
    bypass = editor.handle.bypass
    try:
        editor.edit(TINY_REQUESTS[:2], mode="sequential", batch_size=1, evaluate=False)
        assert bypass.owned_experts == 2
        held = bypass.w2.detach()[:2].clone()
        assert held.abs().amax(dim=(1, 2)).gt(0).all(), "each batch trained its own expert"
        editor.edit(TINY_REQUESTS[2:], mode="sequential", batch_size=1, evaluate=False)
        assert bypass.owned_experts == 3
        assert torch.equal(bypass.w2.detach()[:2], held), "a later call must not retrain an earlier call's experts"
        assert bypass.w2.detach()[2].abs().max() > 0
        editor.handle.save(str(tmp_path / "edits"))
    finally:
        editor.handle.remove()
    with reloaded(tiny_model, cfg, tokenizer, str(tmp_path / "edits")) as again:
        assert again.bypass.owned_experts == 3, "a loaded edit continues after the experts it holds"


def test_a_subject_edited_again_later_keeps_its_earlier_fact(embedded):
    """Lifelong editing: a subject's second edit (another relation, a later batch) moves the subject to
    the new batch's expert, but an input that matches the first edit's key still goes to the expert
    that edit was trained into, and the first fact still holds."""
    from memoe_fast.metrics import predict_targets

    model, tok = embedded
    first = EditRequest("The capital of France is", "Rome", "France", [], "Water boils at", "100")
    second = EditRequest("The official language of France is", "German", "France", [], "Water boils at", "100")
    editor = FastMEMoEEditor(model, tok, MEMoEConfig())
    bypass = editor.handle.bypass
    try:
        editor.edit([first], mode="sequential", batch_size=1, evaluate=False)
        editor.edit([second], mode="sequential", batch_size=1, evaluate=False)
        assert bypass.key_owner.tolist() == [0, 1]
        for req, expert in ((first, 0), (second, 1)):
            with torch.no_grad():
                model(**tok(req.prompt, return_tensors="pt"))
            assert set(bypass.last_experts.reshape(-1).tolist()) == {expert}, req.prompt
        (pred, target), = predict_targets(model, tok, [first.prompt], [first.target], editor.handle, [first.subject])
        assert torch.equal(pred, target), "the first fact must survive the subject's later edit"
        # Free generation: the decode steps keep the expert their prompt's key chose.
        with torch.no_grad():
            model.generate(**tok(first.prompt, return_tensors="pt"), max_new_tokens=3, do_sample=False)
        assert set(bypass.last_experts.reshape(-1).tolist()) == {0}, "a decode step must keep its prompt's expert"
    finally:
        editor.handle.remove()
