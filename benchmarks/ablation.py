"""Ablations and option sweeps on a development split: one row per configuration, every metric.

    python benchmarks/ablation.py --data zsre:../shared/data/zsre_mend_train-1k.json --n 30 \
        --rows default paper no-scope token-routing top2 experts-1 experts-8 no-key-gate no-snap after-match negatives-2 ft-l \
        --out ablation.jsonl --markdown

The unedited model's measurements (locality tokens, same-subject cases) are taken once; each row then
builds a fresh bypass from ``MEMoEConfig(**ROWS[row])`` (the library's defaults plus the row's
changes), trains it with the fast editor (batch, or sequential with ``_mode``/``_batch_size``),
measures, and takes the bypass out again. ``ft-l`` is the FT-L baseline: the edited block's host
down-projection itself trained on the edits (no bypass, no scope), as in EasyEdit's FT-L. Use the
train splits only: the test splits are for reporting.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROWS = {
    "default": {},
    "paper": {"_paper": True},
    "no-scope": {"anchor_scope": False},
    "token-routing": {"routing": "token"},
    "top2": {"top_k": 2},
    "experts-1": {"num_experts": 1},
    "experts-4": {"num_experts": 4},
    "experts-8": {"num_experts": 8},
    "experts-16": {"num_experts": 16},
    "top2-experts-8": {"top_k": 2, "num_experts": 8},
    "experts-16-ffn-384": {"num_experts": 16, "expert_ffn": 384, "expert_init": "random_zero_down"},
    "random-init": {"expert_init": "random_zero_down"},
    "balanced": {"expert_assignment": "balanced"},
    "balanced-experts-16": {"expert_assignment": "balanced", "num_experts": 16},
    "stop-0.005": {"stop_loss": 0.005},
    "no-key-gate": {"key_threshold": None},
    "no-snap": {"key_snap": 0.0},
    "after-match": {"key_span": "after_match"},
    "v0.2-gate": {"key_span": "after_match", "key_snap": 0.0, "bypass_positions": "after_subject",
                  "key_threshold": 0.85, "key_subject_rank": 0},
    "after-subject": {"bypass_positions": "after_subject"},
    "no-chat": {"chat_augment": False},
    "negatives-2": {"negatives": 2},
    "negatives-4-relations": {"negatives": 4, "negative_other_relations": True},
    "plain-cosine": {"key_subject_rank": 0, "key_threshold": 0.825},
    "rank-16": {"key_subject_rank": 16, "key_threshold": 0.5},
    "key-0.40": {"key_threshold": 0.40},
    "key-0.50": {"key_threshold": 0.50},
    "key-0.25": {"key_threshold": 0.25},
    "key-0.175": {"key_threshold": 0.175},
    "snap-best": {"key_snap_tokens": "best"},
    "plain-cosine-0.80": {"key_subject_rank": 0, "key_threshold": 0.80},
    "plain-cosine-0.85": {"key_subject_rank": 0, "key_threshold": 0.85},
    "context-1": {"context_prefixes": 1},
    "context-3": {"context_prefixes": 3},
    "context-5": {"context_prefixes": 5},
    "ft-l": {"_ftl": True},
}
SHOW = ("reliability", "generality", "locality", "same_subject_locality", "same_subject_greedy",
        "greedy_reliability", "greedy_generality", "chat_reliability", "portability")


def _ftl(model, tokenizer, requests, layer: int, steps: int = 30, lr: float = 5e-4):
    """FT-L: train the edited block's MLP down-projection on the edits (NLL of the targets)."""
    import torch

    from memoe_fast.integration import transformer_blocks
    from memoe_fast.metrics import collate, encode_pair, target_logits
    from memoe_fast.editing.editor import nll_loss

    mlp = transformer_blocks(model)[layer].mlp
    weight = (mlp.down_proj if hasattr(mlp, "down_proj") else mlp.c_proj).weight
    saved = weight.detach().clone()
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    batch = collate([encode_pair(tokenizer, r.prompt, r.target) for r in requests], tokenizer.pad_token_id)
    for _ in range(steps):
        opt.zero_grad()
        loss = nll_loss(target_logits(model, batch), batch)
        loss.backward()
        opt.step()
    weight.requires_grad_(False)
    return weight, saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--offset", type=int, default=0,
                   help="skip this many records first (compare options on two disjoint slices of a split)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--out", default="ablation.jsonl")
    p.add_argument("--markdown", action="store_true", help="print the rows as a markdown table at the end")
    p.add_argument("--no-user-metrics", action="store_true",
                   help="Reliability / Generality / Locality only (no same-subject, greedy, chat, routing)")
    args = p.parse_args(argv)

    import torch

    from memoe_fast.config import MEMoEConfig
    from memoe_fast.datasets import load_requests
    from memoe_fast.editing.fast_editor import FastMEMoEEditor
    from memoe_fast.metrics import attach_expected_argmax, evaluate, evaluate_user, routing_analysis, same_subject_cases
    from memoe_fast.models import load_model

    model, tok = load_model()
    requests = load_requests(args.data, args.offset + args.n)[args.offset:]
    pre = None
    rows = []
    for name in args.rows:
        over = dict(ROWS[name])
        paper, ftl = over.pop("_paper", False), over.pop("_ftl", False)
        cfg = MEMoEConfig.paper(**over) if paper else MEMoEConfig(**over)
        editor = FastMEMoEEditor(model, tok, cfg)
        if pre is None:
            pre_loc, same = editor.pre_locality(requests), None
            if not args.no_user_metrics:
                with editor.handle.disabled():
                    same = same_subject_cases(model, tok, requests, editor.handle)
                    attach_expected_argmax(model, tok, same, editor.handle)
            pre = (pre_loc, same)
        pre_loc, same = pre
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        restore = None
        if ftl:
            editor.handle.remove()
            restore = _ftl(model, tok, requests, editor.handle.layer)
            handle = None
        else:
            editor.train(requests)
            handle = editor.handle
        edit_s = time.perf_counter() - t0
        m = evaluate(model, tok, requests, handle, pre_loc, logits_fn=editor.eval_logits_fn() if handle else None)
        u = {}
        if not args.no_user_metrics:
            u = evaluate_user(model, tok, requests, handle, same)
            u.pop("per_example")
        row = {"row": name, **{k: m[k] for k in ("reliability", "generality", "locality")}, **u,
               "edit_s": round(edit_s, 1), "config": cfg.to_dict() if not ftl else "FT-L"}
        if handle is not None:
            if not args.no_user_metrics:
                row["routing"] = routing_analysis(model, tok, handle, requests, same)
            handle.remove()
        else:
            weight, saved = restore
            with torch.no_grad():
                weight.copy_(saved)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    if args.markdown:
        f = lambda v: "–" if v is None else f"{v:.3f}"
        print("| row | " + " | ".join(SHOW) + " | edit s |")
        print("|---|" + "---:|" * (len(SHOW) + 1))
        for r in rows:
            print(f"| {r['row']} | " + " | ".join(f(r.get(k)) for k in SHOW) + f" | {r['edit_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
