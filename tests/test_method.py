"""The editing method beyond the paper: bypass positions after the subject, same-subject negatives,
update groups, one expert per sequential batch (frozen afterwards), checkpoint and resume."""
import os

import pytest
import torch

from memoe_fast import MEMoEConfig, apply_memoe
from memoe_fast.anchors import SubjectMatcher, first_token_after
from memoe_fast.datasets import EditRequest
from memoe_fast.editing.editor import MEMoEEditor, row_loss
from memoe_fast.editing.fast_editor import FastMEMoEEditor
from memoe_fast.testing import reloaded

REQUESTS = [
    EditRequest("The capital of France is", "Rome", "France", ["France's capital city is"],
                "The largest planet is", "Jupiter", ground_truth="Paris"),
    EditRequest("Barack Obama was born in", "Canada", "Barack Obama", ["The birthplace of Barack Obama is"],
                "Water boils at", "100 degrees", ground_truth="Hawaii"),
    EditRequest("Apple was founded by", "Bill Gates", "Apple", ["The founder of Apple is"],
                "The Eiffel Tower is in", "Paris", ground_truth="Steve Jobs"),
    EditRequest("The Danube flows into the", "Baltic Sea", "Danube", ["The Danube ends in the"],
                "Mount Everest is in", "Nepal", ground_truth="Black Sea"),
]


@pytest.mark.parametrize("text,entity", [
    pytest.param("The capital of France is", "France", id="mid-sentence"),
    pytest.param("What is the product made by UniFirst?", "UniFirst", id="before-punctuation"),
    pytest.param("Barack Obama was born in", "Barack Obama", id="text-start"),
])
def test_first_token_after_an_entity(tokenizer, text, entity):
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    end = text.index(entity) + len(entity)
    k = first_token_after(tokenizer, ids, end)
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert decode(ids[:k]).endswith(entity)  # the entity ends inside token k-1 ...
    assert len(decode(ids[:k - 1])) < end  # ... and not before it
    assert first_token_after(tokenizer, ids, -1) == 0


def test_subject_matcher_equals_one_alternation():
    import re

    subjects = ["Apple", "Apple Records", "the Danube", "New York", "York", "C++", "Ōsaka"]
    texts = ["Apple Records was founded", "I love apple pie", "The Danube flows", "New York and York",
             "Pineapple", "C++ is", "Ōsaka castle", "nothing here"]
    plain = re.compile(r"(?<!\w)(" + "|".join(re.escape(s) for s in sorted(subjects, key=len, reverse=True))
                       + r")(?!\w)", re.IGNORECASE)
    matcher = SubjectMatcher(subjects)
    for t in texts:
        assert matcher.find(t) == [(m.group(0), m.start(), m.end()) for m in plain.finditer(t)], t


def _bypass_handle(model, tokenizer, **kw):
    cfg = MEMoEConfig(layer=1, impl="reference", **kw)
    handle = apply_memoe(model, cfg, tokenizer)
    with torch.no_grad():
        handle.bypass.w2.normal_(0, 0.5)  # every expert adds something
    handle.add_subjects(["France"])
    return handle


def test_after_subject_positions_leave_the_subject_and_what_precedes_it_unchanged(tiny_model, tokenizer):
    text = "The capital of France is the city of"
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        base = tiny_model(**enc).logits
    handle = _bypass_handle(tiny_model, tokenizer, bypass_positions="after_subject")
    try:
        with torch.no_grad():
            edited = tiny_model(**enc).logits  # the hook computes anchors and positions from the text
        ids = enc["input_ids"][0].tolist()
        k = first_token_after(tokenizer, ids, text.index("France") + len("France"))
        assert 0 < k < len(ids)
        torch.testing.assert_close(edited[0, :k], base[0, :k], rtol=0, atol=0)
        assert (edited[0, k:] - base[0, k:]).abs().amax(-1).min() > 1e-3  # every later position moves
    finally:
        handle.remove()


def test_all_positions_move_the_subject_too(tiny_model, tokenizer):
    text = "The capital of France is the city of"
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        base = tiny_model(**enc).logits
    handle = _bypass_handle(tiny_model, tokenizer, bypass_positions="all")
    try:
        with torch.no_grad():
            edited = tiny_model(**enc).logits
        assert (edited[0] - base[0]).abs().amax(-1).min() > 1e-3
    finally:
        handle.remove()


def test_forced_route_picks_the_owner_expert(tiny_model, tokenizer):
    handle = _bypass_handle(tiny_model, tokenizer, num_experts=3)
    bypass = handle.bypass
    x = torch.randn(2, 5, bypass.hidden_size)
    try:
        with torch.no_grad():
            outs = []
            for e in range(3):
                bypass.set_anchors(torch.randn(2, bypass.anchor_dim), route=torch.tensor([e, e]))
                outs.append(bypass(x))
                assert bool((bypass.last_experts == e).all())
            bypass.set_anchors(torch.randn(2, bypass.anchor_dim), route=torch.tensor([2, 0]))
            mixed = bypass(x)
        torch.testing.assert_close(mixed[0], outs[2][0])
        torch.testing.assert_close(mixed[1], outs[0][1])
    finally:
        handle.remove()


def test_added_experts_start_silent_and_frozen_ones_get_no_gradient(tiny_model, tokenizer):
    handle = _bypass_handle(tiny_model, tokenizer, num_experts=2)
    bypass = handle.bypass
    x = torch.randn(1, 4, bypass.hidden_size)
    try:
        new = bypass.add_experts(1)
        assert list(new) == [2] and bypass.num_experts == 3 and bypass.frozen_experts == 2
        bypass.set_anchors(torch.randn(1, bypass.anchor_dim), route=torch.tensor([2]))
        with torch.no_grad():
            torch.testing.assert_close(bypass(x), bypass.base_layer(x), rtol=0, atol=0)
        bypass.set_anchors(torch.randn(1, bypass.anchor_dim), route=torch.tensor([0]), pin=True)
        bypass(x).sum().backward()
        assert bypass.w2.grad is not None and bool((bypass.w2.grad == 0).all())  # expert 0 is frozen
        bypass.freeze_experts(0)
        bypass.w2.grad = None
        bypass(x).sum().backward()
        assert bypass.w2.grad[0].abs().sum() > 0
    finally:
        handle.remove()


def test_row_loss_kl_is_zero_at_the_reference_and_positive_elsewhere():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, 50), -1)
    targets = torch.randint(0, 50, (6,))
    negative = torch.tensor([False, False, True, True, True, False])
    top = logp.topk(8, -1)
    n_edit, n_neg = torch.tensor(3), torch.tensor(3)
    base = row_loss(logp, targets, n_edit, n_neg)  # edit rows only? no: every row counts without negatives
    assert base == pytest.approx(float(-logp.gather(-1, targets[:, None]).sum() / 3))
    at_ref = row_loss(logp, targets, n_edit, n_neg, negative, top.indices, top.values)
    nll = float(-logp[~negative].gather(-1, targets[~negative][:, None]).sum() / 3)
    assert float(at_ref) == pytest.approx(nll, abs=1e-6)  # the KL part vanishes at the unedited distribution
    moved = torch.log_softmax(logp + torch.randn(6, 50), -1)
    assert float(row_loss(moved, targets, n_edit, n_neg, negative, top.indices, top.values)) > \
        float(-moved[~negative].gather(-1, targets[~negative][:, None]).sum() / 3)


@pytest.mark.parametrize("kw", [
    pytest.param(dict(bypass_positions="after_subject"), id="after-subject"),
    pytest.param(dict(bypass_positions="after_subject", negatives=2, negative_tokens=2), id="after-subject-negatives"),
    pytest.param(dict(negatives=2, negative_tokens=3, update_batch=2), id="negatives-update-groups"),
])
def test_fast_editor_matches_reference_with_the_method_options(tiny_model, tokenizer, kw):
    losses = []
    for cls in (MEMoEEditor, FastMEMoEEditor):
        editor = cls(tiny_model, tokenizer, MEMoEConfig(layer=2, steps=4, lr=1e-2, impl="reference", stop_loss=0, **kw))
        try:
            losses.append(editor.train(REQUESTS))
        finally:
            editor.handle.remove()
    ref, fast = losses
    assert len(ref) == 4 and ref[-1] < ref[0]
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=1e-4, atol=1e-5)


def test_update_groups_take_one_update_per_group(tiny_model, tokenizer, monkeypatch):
    editor = FastMEMoEEditor(tiny_model, tokenizer, MEMoEConfig(layer=1, steps=3, impl="reference", update_batch=3,
                                                                stop_loss=0))
    calls = []
    step = torch.optim.Adam.step

    def counted(self, *a, **k):
        calls.append(1)
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    try:
        losses = editor.train(REQUESTS)  # 4 edits in groups of 3: two updates per step
    finally:
        editor.handle.remove()
    assert len(losses) == 3 and len(calls) == 6


def test_negatives_are_about_the_subject_and_skip_the_edited_relation(tiny_model, tokenizer):
    editor = MEMoEEditor(tiny_model, tokenizer, MEMoEConfig(layer=1, negatives=3, negative_tokens=2))
    try:
        negs = editor.negatives(REQUESTS)
    finally:
        editor.handle.remove()
    assert negs, "no negatives were built"
    for n in negs:
        r = REQUESTS[n["owner"]]
        assert r.subject in n["prompt"]
        assert n["ref_ids"].shape == n["ref_logp"].shape == (len(n["pair"][1]), 32)
        # The unedited model's own greedy continuation is the top token at every slot.
        assert n["ref_ids"][:, 0].tolist() == n["pair"][1]
    assert max(sum(n["owner"] == i for n in negs) for i in range(len(REQUESTS))) <= 3


def test_per_batch_experts_keep_earlier_batches_exactly(tiny_model, tokenizer):
    cfg = MEMoEConfig(layer=1, steps=3, lr=1e-2, impl="reference", sequential_experts="per_batch", num_experts=1,
                      stop_loss=0)
    editor = FastMEMoEEditor(tiny_model, tokenizer, cfg)
    first, second = REQUESTS[:2], REQUESTS[2:]
    probe = [r.prompt + " " + r.target for r in first]
    enc = tokenizer(probe, return_tensors="pt", padding=True)
    try:
        editor.edit(first + second, mode="sequential", batch_size=2, evaluate=False)
        assert editor.handle.bypass.num_experts == 2
        with torch.no_grad():
            after_both = tiny_model(**enc).logits
        # Training a third batch must not move the first batch's outputs at all: its expert is frozen and
        # its subjects route to it.
        editor.handle.bypass.add_experts(1)
        editor.handle.bypass.freeze_experts(2)
        editor.train([REQUESTS[3]], owner=2)
        with torch.no_grad():
            later = tiny_model(**enc).logits
        torch.testing.assert_close(later, after_both, rtol=0, atol=0)
    finally:
        editor.handle.remove()


def test_sequential_resume_ends_where_an_uninterrupted_run_ends(tiny_model, tokenizer, tmp_path):
    cfg = MEMoEConfig(layer=1, steps=3, lr=1e-2, impl="reference", sequential_experts="per_batch", num_experts=1,
                      stop_loss=0)

    def run(ckpt, fail_at=None):
        editor = FastMEMoEEditor(tiny_model, tokenizer, cfg)
        train = editor.train
        count = {"n": 0}

        def train_or_die(*a, **k):
            if count["n"] == fail_at:
                raise KeyboardInterrupt("killed")
            count["n"] += 1
            return train(*a, **k)

        editor.train = train_or_die
        try:
            result = editor.edit(REQUESTS, mode="sequential", batch_size=1, evaluate=False, checkpoint_dir=str(ckpt),
                                 resume=True)
            return result, {k: v.detach().clone() for k, v in editor.handle.bypass.bypass_parameters().items()}
        finally:
            editor.handle.remove()

    whole, whole_w = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", fail_at=2)
    import json

    assert json.load(open(tmp_path / "b" / "memoe.json"))["batches_done"] == 2
    resumed, resumed_w = run(tmp_path / "b")
    assert resumed["losses"] == whole["losses"]
    for name in whole_w:
        torch.testing.assert_close(resumed_w[name], whole_w[name], rtol=0, atol=0, msg=name)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tiny_model, tokenizer, tmp_path):
    cfg = MEMoEConfig(layer=1, steps=2, impl="reference", stop_loss=0)
    editor = FastMEMoEEditor(tiny_model, tokenizer, cfg)
    calls = {"n": 0}
    step = editor.backward_step

    def nan_on_second_batch(*a, **k):
        calls["n"] += 1
        return float("nan") if calls["n"] > 2 else step(*a, **k)

    editor.backward_step = nan_on_second_batch
    try:
        with pytest.raises(FloatingPointError, match="diverged"):
            editor.edit(REQUESTS[:2], mode="sequential", batch_size=1, evaluate=False, checkpoint_dir=str(tmp_path))
        saved = {k: v.clone() for k, v in editor.handle.bypass.bypass_parameters().items()}
    finally:
        editor.handle.remove()
    import json

    assert json.load(open(tmp_path / "memoe.json"))["batches_done"] == 1
    from safetensors.torch import load_file

    on_disk = load_file(os.path.join(tmp_path, "bypass.safetensors"))
    # The failed step was never applied: what is in memory equals the last good state on disk.
    assert set(saved) <= set(on_disk)
    for name, t in saved.items():
        torch.testing.assert_close(t, on_disk[name], rtol=0, atol=0, msg=name)


def test_key_gate_switches_on_at_the_matching_token_and_stays_on(tiny_model, tokenizer):
    handle = _bypass_handle(tiny_model, tokenizer, key_threshold=0.99, key_span="after_match", key_snap=0.0)
    bypass = handle.bypass
    try:
        x = torch.randn(2, 6, bypass.hidden_size)
        # Sequence 0's token 3 is its subject's key; sequence 1 has no matching token.
        bypass.add_keys(x[0, 3:4].clone(), torch.tensor([0]))
        base = bypass.base_layer(x)
        cand = torch.tensor([[True], [True]])
        with torch.no_grad():
            bypass.set_anchors(torch.randn(2, bypass.anchor_dim), torch.tensor([True, True]), candidates=cand)
            y = bypass(x)
        torch.testing.assert_close(y[0, :3], base[0, :3], rtol=0, atol=0)
        assert (y[0, 3:] - base[0, 3:]).abs().amax(-1).min() > 1e-4  # on from the match, and after it
        torch.testing.assert_close(y[1], base[1], rtol=0, atol=0)
        assert bypass.last_latched.tolist() == [True, False]
        # A decode step of a latched sequence is on whatever its own state; a key of another subject never matches.
        step = torch.randn(2, 1, bypass.hidden_size)
        with torch.no_grad():
            bypass.set_anchors(torch.randn(2, bypass.anchor_dim), torch.tensor([True, True]), candidates=cand,
                               latched=torch.tensor([True, False]))
            z = bypass(step)
            assert (z[0] - bypass.base_layer(step)[0]).abs().max() > 1e-4
            torch.testing.assert_close(z[1], bypass.base_layer(step)[1], rtol=0, atol=0)
            bypass.set_anchors(torch.randn(2, bypass.anchor_dim), torch.tensor([True, True]),
                               candidates=torch.tensor([[False], [False]]))
            torch.testing.assert_close(bypass(x), base, rtol=0, atol=0)
    finally:
        handle.remove()


def test_key_span_whole_input_switches_on_every_token_of_a_matching_sequence(tiny_model, tokenizer):
    handle = _bypass_handle(tiny_model, tokenizer, key_threshold=0.99, key_span="whole_input")
    bypass = handle.bypass
    try:
        x = torch.randn(2, 6, bypass.hidden_size)
        bypass.add_keys(x[0, 4:5].clone(), torch.tensor([0]))  # sequence 0 matches at token 4 only
        base = bypass.base_layer(x)
        with torch.no_grad():
            bypass.set_anchors(torch.randn(2, bypass.anchor_dim), torch.tensor([True, True]),
                               candidates=torch.tensor([[True], [True]]))
            y = bypass(x)
        assert (y[0] - base[0]).abs().amax(-1).min() > 1e-4  # before the match too
        torch.testing.assert_close(y[1], base[1], rtol=0, atol=0)
        assert bypass.last_latched.tolist() == [True, False]
        # Tokens that may not match (a teacher-forced target) never switch their sequence on.
        key_tokens = torch.ones(2, 6, dtype=torch.bool)
        key_tokens[0, 4:] = False
        with torch.no_grad():
            bypass.set_anchors(torch.randn(2, bypass.anchor_dim), torch.tensor([True, True]),
                               candidates=torch.tensor([[True], [True]]), key_tokens=key_tokens)
            torch.testing.assert_close(bypass(x), base, rtol=0, atol=0)
    finally:
        handle.remove()


@pytest.mark.parametrize("snap", [1.0, 0.5])
def test_key_snap_moves_a_matched_token_toward_its_nearest_key(tiny_model, tokenizer, snap):
    handle = _bypass_handle(tiny_model, tokenizer, key_threshold=0.5, key_snap=snap)
    bypass = handle.bypass
    try:
        torch.manual_seed(0)
        keys = torch.randn(2, bypass.hidden_size)
        bypass.add_keys(keys, torch.tensor([0, 0]))
        unit = torch.nn.functional.normalize(keys, dim=-1)
        # Token 0 lies near key 1 (at 3x its norm), token 1 matches no key.
        near = 3 * keys[1].norm() * torch.nn.functional.normalize(unit[1] + 0.3 * torch.randn(bypass.hidden_size)
                                                                   / bypass.hidden_size ** 0.5, dim=-1)
        x = torch.stack([near, -keys[0] - keys[1]]).unsqueeze(0)
        anchor = torch.randn(1, bypass.anchor_dim)
        cand = torch.tensor([[True, True]])
        direction = torch.nn.functional.normalize((1 - snap) * torch.nn.functional.normalize(near, dim=-1)
                                                  + snap * unit[1], dim=-1)
        snapped = (direction * near.norm()).view(1, 1, -1)
        with torch.no_grad():
            bypass.set_anchors(anchor, torch.tensor([True]), candidates=cand)
            y = bypass.moe_output(x)
            # The expert term of a state as it is: a latched step whose subject has no keys (nothing snaps).
            bypass.set_anchors(anchor, torch.tensor([True]), candidates=torch.tensor([[False, False]]),
                               latched=torch.tensor([True]), pin=True)
            want = bypass.moe_output(snapped)
            assert (bypass.moe_output(near.view(1, 1, -1)) - want).abs().max() > 1e-3  # snapping matters
            bypass.clear_anchors()
        torch.testing.assert_close(y[0, 0], want[0, 0], rtol=1e-5, atol=1e-5)
        assert y[0, 1].abs().max() > 1e-4  # latched after the match: on, but read unsnapped
    finally:
        handle.remove()


@pytest.mark.parametrize("rank", [0, 1])
def test_key_gate_compares_the_question_without_the_subject_directions(tiny_model, tokenizer, rank):
    # Two prompts about one subject share its (large) direction s and differ in the relation they ask
    # (r1, r2): the plain cosine cannot tell them apart; without s the gate passes only the key's relation.
    handle = _bypass_handle(tiny_model, tokenizer, key_threshold=0.8, key_subject_rank=rank, key_span="after_match")
    bypass = handle.bypass
    try:
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(bypass.hidden_size, 3, generator=g))
        s, r1, r2 = q.t()
        key = 5 * s + r1
        para = 5 * s + r1 + 0.3 * torch.nn.functional.normalize(torch.randn(bypass.hidden_size, generator=g), dim=0)
        other = 5 * s + r2
        if rank:
            bypass.add_subject_basis(torch.tensor([0]), s.view(1, 1, -1))
        bypass.add_keys(key.view(1, -1), torch.tensor([0]))
        x = torch.stack([para, other]).view(2, 1, -1)
        base = bypass.base_layer(x)
        with torch.no_grad():
            bypass.set_anchors(torch.randn(2, bypass.anchor_dim), torch.tensor([True, True]),
                               candidates=torch.tensor([[True], [True]]))
            y = bypass(x)
        assert (y[0] - base[0]).abs().max() > 1e-4  # the paraphrase reaches the experts either way
        if rank:
            torch.testing.assert_close(y[1], base[1], rtol=0, atol=0)  # another question about s does not
        else:
            assert (y[1] - base[1]).abs().max() > 1e-4
        # The similarity is the cosine of both vectors with s removed (plain cosine without a basis).
        rows = torch.stack([para, other, r2 - 2 * s])
        got = bypass._key_similarity(rows, torch.ones(3, 1, dtype=torch.bool))[:, 0]
        off = (lambda v: v - (v @ s) * s) if rank else (lambda v: v)
        want = torch.stack([torch.nn.functional.cosine_similarity(off(v), off(key), dim=0) for v in rows])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()


def test_key_snap_tokens_best_snaps_only_the_closest_match_of_a_sequence(tiny_model, tokenizer):
    handle = _bypass_handle(tiny_model, tokenizer, key_threshold=0.5, key_snap=1.0, key_snap_tokens="best")
    bypass = handle.bypass
    try:
        g = torch.Generator().manual_seed(1)
        keys = torch.randn(2, bypass.hidden_size, generator=g)
        bypass.add_keys(keys, torch.tensor([0, 0]))
        unit = torch.nn.functional.normalize(keys, dim=-1)
        noise = torch.nn.functional.normalize(torch.randn(2, bypass.hidden_size, generator=g), dim=-1)
        close = 2.0 * torch.nn.functional.normalize(unit[1] + 0.1 * noise[0], dim=-1)  # cosine ~0.99 to key 1
        far = 2.0 * torch.nn.functional.normalize(unit[0] + 0.6 * noise[1], dim=-1)  # ~0.86 to key 0: matches too
        x = torch.stack([far, close]).unsqueeze(0)
        anchor = torch.randn(1, bypass.anchor_dim)
        with torch.no_grad():
            bypass.set_anchors(anchor, torch.tensor([True]), candidates=torch.tensor([[True, True]]))
            y = bypass.moe_output(x)
            # The expert term with only the closest token moved onto its key (latched: nothing snaps by itself).
            bypass.set_anchors(anchor, torch.tensor([True]), candidates=torch.tensor([[False, False]]),
                               latched=torch.tensor([True]), pin=True)
            want = bypass.moe_output(torch.stack([far, unit[1] * close.norm()]).unsqueeze(0))
            both = bypass.moe_output(torch.stack([unit[0] * far.norm(), unit[1] * close.norm()]).unsqueeze(0))
            bypass.clear_anchors()
        assert (want[0, 0] - both[0, 0]).abs().max() > 1e-3  # snapping the far token would show
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()


def test_key_gate_packed_rows_match_padded_rows(tiny_model, tokenizer):
    handle = _bypass_handle(tiny_model, tokenizer, key_threshold=0.99, key_span="after_match", key_snap=0.0)
    bypass = handle.bypass
    try:
        x = torch.randn(3, 5, bypass.hidden_size)
        bypass.add_keys(torch.stack([x[0, 1], x[2, 4]]), torch.tensor([0, 0]))
        anchors = torch.randn(3, bypass.anchor_dim)
        cand = torch.ones(3, 2, dtype=torch.bool)
        scope = torch.tensor([True, True, True])
        with torch.no_grad():
            bypass.set_anchors(anchors, scope, candidates=cand)
            padded = bypass(x)
            bypass.set_anchors(anchors, scope, torch.arange(3).repeat_interleave(5), candidates=cand)
            packed = bypass(x.reshape(15, -1))
        torch.testing.assert_close(packed.reshape(3, 5, -1), padded, rtol=0, atol=0)
    finally:
        handle.remove()


def test_key_gate_edits_are_kept_through_save_and_load(tiny_model, tokenizer, tmp_path):
    cfg = MEMoEConfig(layer=1, steps=3, lr=1e-2, impl="reference", key_threshold=0.9, bypass_positions="after_subject",
                      stop_loss=0, key_subject_rank=32)
    editor = FastMEMoEEditor(tiny_model, tokenizer, cfg)
    enc = tokenizer([REQUESTS[0].prompt], return_tensors="pt")
    try:
        editor.train(REQUESTS[:2])
        assert editor.handle.bypass.keys.shape[0] == 2
        with torch.no_grad():
            edited = tiny_model(**enc).logits
            with editor.handle.disabled():
                base = tiny_model(**enc).logits
        assert (edited[0, -1] - base[0, -1]).abs().max() > 1e-4  # the edit prompt's last token matches its key
        saved_gate = {n: getattr(editor.handle.bypass, n).clone() for n in ("keys", "key_basis", "key_proj", "key_basis_idx")}
        editor.handle.save(str(tmp_path / "e"))
    finally:
        editor.handle.remove()
    with reloaded(tiny_model, cfg, tokenizer, str(tmp_path / "e")) as handle:
        with torch.no_grad():
            torch.testing.assert_close(tiny_model(**enc).logits, edited, rtol=0, atol=0)
        # The subject subspaces come back with the keys (they decide what the gate compares).
        # (keys are unit vectors normalised again on load: equal to rounding.)
        for name in ("keys", "key_basis", "key_proj", "key_basis_idx"):
            torch.testing.assert_close(getattr(handle.bypass, name), saved_gate[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        assert handle.bypass.key_basis.shape[:2] == (2, min(cfg.key_subject_rank, handle.bypass.hidden_size // 4))


def test_edit_takes_easyedit_request_dicts(tiny_model, tokenizer):
    editor = FastMEMoEEditor(tiny_model, tokenizer, MEMoEConfig(layer=1, steps=2, impl="reference"))
    try:
        result = editor.edit([{"prompt": "The capital of France is", "target_new": "Rome", "subject": "France",
                               "rephrase_prompt": "France's capital city is",
                               "locality": {"neighborhood": {"prompt": "Water boils at", "ground_truth": "100"}}}],
                             evaluate=True)
        assert result["n_edits"] == 1 and result["post"]["locality"] is not None
        with pytest.raises(ValueError, match="not both"):
            editor.edit([REQUESTS[0], {"prompt": "a", "target_new": "b", "subject": "a"}], evaluate=False)
    finally:
        editor.handle.remove()


def test_a_token_running_past_the_entity_counts_as_after_it(tokenizer):
    text = "What company made USS Leedstown (APA-56)?"
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    end = text.index("(APA-56)") + len("(APA-56)")
    k = first_token_after(tokenizer, ids, end)
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert k < len(ids), "the question mark must leave a token for the experts"
    assert len(decode(ids[:k])) < end <= len(decode(ids[:k + 1]))


def test_mlp_inputs_come_back_in_order_whatever_the_batching(tiny_model, tokenizer):
    # Key and subject-subspace states are computed in length-sorted batches: each list's states must be
    # its own, equal to running it alone (unpadded), for lists longer than one batch and out of order.
    editor = MEMoEEditor(tiny_model, tokenizer, MEMoEConfig(layer=1))
    editor.eval_batch_size = 3
    texts = ["Tell me about the Danube, the second longest river of Europe.", "Paris", "Apple was founded by",
             "Who is Barack Obama?", "Water boils at", "The Eiffel Tower is in the city of Paris, France.", "Hi"]
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    together = editor._mlp_inputs(encoded)
    for ids, got in zip(encoded, together):
        alone = editor._mlp_inputs([ids])[0]
        assert got.shape == (len(ids), alone.shape[1])
        torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)


def test_balanced_assignment_spreads_subjects_and_routes_them(tiny_model, tokenizer):
    # 3 subjects over 2 experts, one edit each: two and one (the gate alone may put them anywhere); a later
    # call's subject goes to the lighter expert; an input about each subject runs through its subject's expert.
    cfg = MEMoEConfig(layer=1, steps=1, lr=1e-2, impl="reference", num_experts=2, stop_loss=0,
                      expert_assignment="balanced")
    editor = FastMEMoEEditor(tiny_model, tokenizer, cfg)
    bank, bypass = editor.handle.bank, editor.handle.bypass
    try:
        editor.train(REQUESTS[:3])
        owners = {r.subject: int(bank.owners[bank.subject_index(r.subject)]) for r in REQUESTS[:3]}
        assert sorted(owners.values()) == [0, 0, 1]
        editor.train(REQUESTS[3:])  # the lighter expert takes the next subject
        assert int(bank.owners[bank.subject_index(REQUESTS[3].subject)]) == 1
        assert bypass.key_owner.tolist() == [owners[r.subject] for r in REQUESTS[:3]] + [1]
        for r in REQUESTS:
            with torch.no_grad():
                tiny_model(**tokenizer([r.prompt], return_tensors="pt"))
            assert bool((bypass.last_experts == bank.owners[bank.subject_index(r.subject)]).all()), r.subject
    finally:
        editor.handle.remove()


def test_context_prefixes_train_each_edit_after_model_written_text_with_its_own_key(tiny_model, tokenizer):
    # Each edit trains after k of the context texts (rotating over the edits), and each such prompt is a
    # key of its subject: asked after that text, the edit reaches the experts, where without the option
    # (the same strict threshold) it does not.
    from memoe_fast.editing.editor import CONTEXT_SEEDS, write_context_texts

    contexts = write_context_texts(tiny_model, tokenizer, 4)
    assert len(contexts) == len(CONTEXT_SEEDS)
    assert all(c.startswith(s) and c.endswith(".") and len(c) > len(s) + 1 for c, s in zip(contexts, CONTEXT_SEEDS))
    latched = {}
    for k in (0, 2):
        cfg = MEMoEConfig(layer=1, steps=1, lr=1e-2, impl="reference", stop_loss=0, chat_augment=False,
                          key_threshold=0.99, context_prefixes=k, context_tokens=4)
        editor = FastMEMoEEditor(tiny_model, tokenizer, cfg)
        try:
            assert editor.context_texts() == (contexts if k else [])
            (_, prompts, subjects), = editor._training_batches(REQUESTS, [])
            want = [r.prompt for r in REQUESTS] + [f"{contexts[(i * k + j) % len(contexts)]} {r.prompt}"
                                                   for i, r in enumerate(REQUESTS) for j in range(k)]
            assert prompts == want
            assert subjects == [r.subject for r in REQUESTS] + [r.subject for r in REQUESTS for _ in range(k)]
            editor.train(REQUESTS)
            assert editor.handle.bypass.key_owner.numel() == len(REQUESTS) * (1 + k)
            text = f"{contexts[3]} {REQUESTS[1].prompt}"  # edit 1's second context text when k = 2
            with torch.no_grad(), editor.handle.anchored([text], [REQUESTS[1].subject]):
                tiny_model(**tokenizer([text], return_tensors="pt"))
            latched[k] = editor.handle.bypass.last_latched.tolist()
        finally:
            editor.handle.remove()
    assert latched == {0: [False], 2: [True]}
