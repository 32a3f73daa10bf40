"""How well the key gate tells a paraphrase of an edit from another question about its subject.

    python benchmarks/key_roc.py --data zsre:../shared/data/zsre_mend_train-1k.json --n 100 --ranks 0 16 32

No training: the gate compares the *unedited* host-MLP inputs at the edited block (the bypass does
not change them), so each record's edit-prompt key, its subject's basis (``key_subject_rank``) and
the similarity of every token of its paraphrases (positives) and of the held-out same-subject
prompts (``EVAL_TEMPLATES``, negatives) come from the library's own code
(:meth:`~memoe_fast.editing.editor.MEMoEEditor.subject_bases`, ``MEMoEBypass._key_similarity``). A
prompt's score is its best token's, as in ``key_span="whole_input"``. Prints, per rank, the AUC and
the fraction of paraphrases / same-subject prompts reaching each threshold, and the threshold that
lets through a given fraction of same-subject prompts. Use the train splits only.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _scores(editor, requests, rank: int):
    import torch

    from memoe_fast.specificity import EVAL_TEMPLATES, fill

    bypass, tok = editor.handle.bypass, editor.tokenizer
    bypass.clear_keys()
    subjects = list(dict.fromkeys(r.subject for r in requests))
    index = {s: i for i, s in enumerate(subjects)}
    if rank:
        editor.config.key_subject_rank = rank
        bypass.add_subject_basis(torch.arange(len(subjects)), editor.subject_bases(subjects))
    enc = lambda t: tok(t, add_special_tokens=True)["input_ids"]
    keys = [x[-1] for x in editor._mlp_inputs([enc(r.prompt) for r in requests])]
    bypass.add_keys(torch.stack(keys), torch.tensor([index[r.subject] for r in requests]))
    pos, neg = [], []
    for i, r in enumerate(requests):
        own = torch.zeros(1, len(requests), dtype=torch.bool)
        own[0, i] = True  # this edit's key only (subjects differ across the records scored here)
        for texts, out in ((list(r.rephrase), pos), ([fill(t, r.subject) for t in EVAL_TEMPLATES], neg)):
            for x in editor._mlp_inputs([enc(t) for t in texts]):
                out.append(float(bypass._key_similarity(x, own.expand(x.shape[0], -1)).max()))
    return pos, neg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--ranks", type=int, nargs="+", default=[0, 32])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.40, 0.45, 0.50, 0.80, 0.825, 0.85])
    args = p.parse_args(argv)

    import torch

    from memoe_fast import MEMoEConfig
    from memoe_fast.datasets import load_requests
    from memoe_fast.editing.fast_editor import FastMEMoEEditor
    from memoe_fast.models import load_model

    torch.set_grad_enabled(False)
    model, tok = load_model()
    requests = [r for r in load_requests(args.data, args.n) if r.subject]
    editor = FastMEMoEEditor(model, tok, MEMoEConfig())
    editor.handle.add_subjects(list(dict.fromkeys(r.subject for r in requests)))
    print(f"{len(requests)} records of {args.data}")
    print("| rank | AUC | " + " | ".join(f"{t:g}: para / same" for t in args.thresholds)
          + " | same 5%: threshold, para | same 10%: threshold, para |")
    print("|---:|---:|" + "---:|" * (len(args.thresholds) + 2))
    for rank in args.ranks:
        pos, neg = (torch.tensor(v) for v in _scores(editor, requests, rank))
        auc = ((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())
        cells = [f"{(pos >= t).float().mean():.3f} / {(neg >= t).float().mean():.3f}" for t in args.thresholds]
        for frac in (0.05, 0.10):
            t = torch.quantile(neg, 1 - frac)
            cells.append(f"{t:.3f}, {(pos > t).float().mean():.3f}")
        print(f"| {rank} | {auc:.3f} | " + " | ".join(cells) + " |", flush=True)
    editor.handle.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
