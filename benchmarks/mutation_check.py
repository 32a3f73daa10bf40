"""Mutation check: does the test suite fail when the core code is wrong?

Each mutant is one small, realistic bug (a text replacement in one core module: ops, registered ops,
bypass, integration, anchors, metrics, editors, datasets). The repository is copied once to a temporary
folder (never touching the working tree); each mutant is applied there alone, the test files that
guard that module run against the copy (``PYTHONPATH`` pointing at it, its ``memoe_fast/kernels``
link pointing at its own ``kernels/``), and the file is restored. A mutant is *killed* when the tests
fail (or run past the per-mutant time budget), *survived* when they pass.

    nice -n 19 python benchmarks/mutation_check.py --min-kill-rate 0.9
    nice -n 19 python benchmarks/mutation_check.py --min-kill-rate 1 --all-tests --only lambda-ignored ...
    python benchmarks/mutation_check.py --check    # only: does every mutant's text occur exactly once?

Exits 1 when the kill rate is below ``--min-kill-rate``, 2 when a mutant no longer applies (its text is
not found exactly once: the code moved, update the mutant) or the unmutated copy fails its tests.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Test files per guarded area, the quick ones first (run with -x: the first failure kills the mutant).
OPS = ["tests/test_torch_path.py", "tests/test_lowprec_combine.py", "tests/test_add_to_oracle.py",
       "tests/test_balance_loss.py"]
BYPASS = ["tests/test_add_to_oracle.py", "tests/test_training_options.py", "tests/test_bypass.py"]
INTEGRATION = ["tests/test_save_load.py", "tests/test_bypass.py"]
ANCHORS = ["tests/test_anchors.py"]
METRICS = ["tests/test_metrics.py"]
EDITORS = ["tests/test_training_options.py", "tests/test_editor.py"]
DATASETS = ["tests/test_data.py"]
CUSTOM_OPS = ["tests/test_custom_op.py"]


@dataclass
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: list[str]


MUTANTS = [
    # ops
    Mutant("lowprec-combine-drops-routing-weights", "memoe_fast/ops/torch_path.py",
           "(y.float() if low_precision else y) * coef.unsqueeze(1).to(acc.dtype)",
           "(y.float() if low_precision else y * coef.unsqueeze(1).to(acc.dtype))", OPS),
    Mutant("torch-gate-no-renormalize", "memoe_fast/ops/torch_path.py",
           "        weights = weights / weights.sum(dim=-1, keepdim=True)\n    return weights, experts, probs",
           "        weights = weights\n    return weights, experts, probs", OPS),
    Mutant("torch-k1-combine-ignores-weights", "memoe_fast/ops/torch_path.py",
           "out = torch.addcmul(host_out, y_tok, coef_tok.unsqueeze(1).to(y.dtype))",
           "out = host_out + y_tok", OPS),
    Mutant("reference-token-scale-ignored", "memoe_fast/ops/reference.py",
           "        y = y * token_scale.float().unsqueeze(-1)", "        y = y", OPS),
    Mutant("reference-gate-ignores-anchor", "memoe_fast/ops/reference.py",
           "z = torch.cat([x, anchor[seq_idx].to(x.dtype)], dim=-1).float()",
           "z = torch.cat([x, torch.zeros_like(anchor[seq_idx]).to(x.dtype)], dim=-1).float()", OPS),
    Mutant("balance-loss-wrong-fraction", "memoe_fast/ops/reference.py",
           "frac = counts / experts.numel()", "frac = counts / experts.shape[0]", OPS + BYPASS),
    # registered ops (torch.library) and the compiled path
    Mutant("custom-op-fake-wrong-experts-shape", "memoe_fast/ops/custom_ops.py",
           "x.new_empty((t, top_k), dtype=torch.int64))", "x.new_empty((t, 1), dtype=torch.int64))", CUSTOM_OPS),
    Mutant("custom-op-backward-fake-wrong-shape", "memoe_fast/ops/custom_ops.py",
           "return [torch.empty_like(v) if (v is not None and need)",
           "return [torch.empty_like(x) if (v is not None and need)", CUSTOM_OPS),
    Mutant("custom-op-backward-grad-scaled", "memoe_fast/ops/custom_ops.py",
           "            result.append(g if g is not None else x.new_empty(0))",
           "            result.append(g * 1.5 if g is not None else x.new_empty(0))", CUSTOM_OPS),
    Mutant("custom-op-backward-drops-down-proj-grad", "memoe_fast/ops/custom_ops.py",
           'g["up_proj"], g["down_proj"],', 'g["up_proj"], None,', CUSTOM_OPS),
    Mutant("custom-op-context-loses-top-k", "memoe_fast/ops/custom_ops.py",
           "ctx.top_k = top_k", "ctx.top_k = 1", CUSTOM_OPS),
    Mutant("compiled-path-drops-bypass", "memoe_fast/ops/moe.py",
           "return moe_bypass_op(impl, x, anchor, seq_idx, **args)",
           "return moe_bypass_op(impl, x, anchor, seq_idx, **dict(args, token_scale=torch.zeros_like(x[:, 0])))",
           CUSTOM_OPS),
    # bypass
    Mutant("lambda-ignored", "memoe_fast/bypass.py",
           "token_scale=None if self.config.scale == 1.0 else torch.full((tokens.shape[0],), self.config.scale, "
           "device=x.device)", "token_scale=None", BYPASS),
    Mutant("key-gate-ignores-subject-basis", "memoe_fast/bypass.py",
           "rest = (sq.index_select(0, r_idx) - (x @ basis[b].t()).square().sum(-1)).clamp_min(1e-12).sqrt()",
           "rest = sq.index_select(0, r_idx).clamp_min(1e-12).sqrt()", ["tests/test_method.py"]),
    Mutant("key-snap-best-snaps-every-match", "memoe_fast/bypass.py",
           'if self.config.key_snap_tokens == "best":', 'if False:', ["tests/test_method.py"]),
    Mutant("scope-ignores-anchor_scope-off", "memoe_fast/bypass.py",
           "if self.config.anchor_scope and given.scope is not None:", "if given.scope is not None:", BYPASS),
    Mutant("scope-selects-out-of-scope-tokens", "memoe_fast/bypass.py",
           "sel = tok_scope.nonzero().squeeze(1).to(x.device)", "sel = (~tok_scope).nonzero().squeeze(1).to(x.device)",
           BYPASS),
    Mutant("unfused-host-output-dropped", "memoe_fast/bypass.py",
           "y = host_rows + y.to(out.dtype)", "y = y.to(out.dtype)", BYPASS),
    Mutant("gate-noise-in-eval", "memoe_fast/bypass.py",
           "if self.training and self.config.gate_noise > 0:", "if self.config.gate_noise > 0:", BYPASS),
    Mutant("expert-init-swapped", "memoe_fast/bypass.py",
           'copy = config.expert_init == "copy_zero_down"', 'copy = config.expert_init == "random_zero_down"', BYPASS),
    Mutant("gate-frozen-despite-balance-loss", "memoe_fast/bypass.py",
           "return self.config.aux_loss_weight > 0 or not (self.config.top_k == 1 and self.config.renormalize)",
           "return not (self.config.top_k == 1 and self.config.renormalize)", BYPASS),
    # integration
    Mutant("load-weights-skips-w_gate", "memoe_fast/integration.py",
           "                p.copy_(tensors[name])",
           "                if name != \"w_gate\":\n                    p.copy_(tensors[name])", INTEGRATION),
    Mutant("load-ignores-format-version", "memoe_fast/integration.py",
           'if meta.get("format_version") not in (1, FORMAT_VERSION):', 'if meta.get("format_version") is None:',
           INTEGRATION),
    Mutant("load-skips-shape-check", "memoe_fast/integration.py",
           "if tensors[name].shape != p.shape:", "if tensors[name].dim() != p.dim():", INTEGRATION),
    Mutant("decode-step-recomputes-anchors", "memoe_fast/integration.py",
           "        if past > 0:\n", "        if past > 1 << 30:\n", INTEGRATION),
    Mutant("default-layer-not-middle", "memoe_fast/integration.py",
           "idx = n // 2 if layer is None else layer", "idx = n - 1 if layer is None else layer", INTEGRATION),
    # anchors
    Mutant("dates-are-anchors", "memoe_fast/anchors.py", '{"DATE", "TIME", ', '{"TIME", ', ANCHORS),
    Mutant("anchor-not-unit-rms", "memoe_fast/anchors.py",
           "vectors[i] = pooled / pooled.pow(2).mean().sqrt().clamp_min(1e-6)", "vectors[i] = pooled", ANCHORS),
    Mutant("subjects-case-sensitive", "memoe_fast/anchors.py",
           r'(?!\w)", re.IGNORECASE', r'(?!\w)", 0', ANCHORS),
    Mutant("scope-needs-every-key", "memoe_fast/anchors.py",
           "hit = (sim >= self.scope_threshold).any(dim=1)", "hit = (sim >= self.scope_threshold).all(dim=1)", ANCHORS),
    # metrics
    Mutant("pred-pos-off-by-one", "memoe_fast/metrics.py",
           "torch.arange(len(p) - 1, len(p) - 1 + len(t))", "torch.arange(len(p), len(p) + len(t))", METRICS),
    Mutant("locality-against-itself", "memoe_fast/metrics.py",
           "pre_loc = pre_locality if pre_locality is not None else post_loc", "pre_loc = post_loc", METRICS),
    Mutant("encode-pair-no-merge-fallback", "memoe_fast/metrics.py",
           'return p_ids, tokenizer(" " + target, add_special_tokens=False)["input_ids"]',
           "return p_ids, full[len(p_ids):]", METRICS),
    Mutant("generality-counts-missing-as-zero", "memoe_fast/metrics.py",
           "generality = [mean(s) for s in gen_scores]", "generality = [mean(s) or 0.0 for s in gen_scores]",
           METRICS),
    # editors
    Mutant("sequential-metrics-wrong-pre-locality", "memoe_fast/editing/editor.py",
           "pre_loc[offset:offset + len(chunk)]", "pre_loc[b:b + len(chunk)]", EDITORS),
    Mutant("fast-editor-drops-balance-loss", "memoe_fast/editing/fast_editor.py",
           "loss = loss + self.config.aux_loss_weight * aux * prefix.sub.input_ids.shape[0] / n_seq",
           "loss = loss", EDITORS),
    Mutant("checkpoint-drops-block-args", "memoe_fast/editing/fast_editor.py",
           "torch.utils.checkpoint.checkpoint(block, hidden, *rest, use_reentrant=False, **kwargs)",
           "torch.utils.checkpoint.checkpoint(block, hidden, use_reentrant=False)", EDITORS),
    Mutant("weight-decay-ignored", "memoe_fast/editing/editor.py",
           "weight_decay=self.config.weight_decay,", "weight_decay=0.0,", EDITORS),
    Mutant("stop-loss-ignored", "memoe_fast/editing/editor.py",
           "if losses[-1] < self.config.stop_loss:", "if losses[-1] < 0:", EDITORS),
    Mutant("constant-schedule-decays", "memoe_fast/editing/editor.py",
           'if self.config.lr_schedule == "cosine" and self.config.steps > 0:', "if self.config.steps > 0:", EDITORS),
    Mutant("reference-loss-mean-over-padding", "memoe_fast/editing/editor.py",
           "batch.target_ids[rows], *loss_totals(batch),", "batch.target_ids[rows], rows.numel(), loss_totals(batch)[1],",
           EDITORS),
    Mutant("replay-drops-earlier-edits", "memoe_fast/editing/editor.py",
           "seen = [r for c in batches[:b] for r in c] if self.config.replay else []",
           "seen = [r for c in batches[:b - 1] for r in c] if self.config.replay else []", EDITORS),
    Mutant("fast-editor-drops-micro-batch-share", "memoe_fast/editing/fast_editor.py",
           "loss = row_loss(logp, prefix.targets, n_edit, n_neg,",
           "loss = row_loss(logp, prefix.targets, prefix.targets.shape[0], n_neg,", EDITORS),
    Mutant("mlp-inputs-in-sorted-order", "memoe_fast/editing/editor.py",
           "                    out[i] = x[row, :len(ids)]",
           "                    out[idx[row - 1]] = x[row, :len(ids)]", ["tests/test_method.py"]),
    # memory model
    Mutant("memory-key-gate-one-copy", "memoe_fast/editing/memory.py",
           '"key_gate": keys * (2 * d * 4 + 16)', '"key_gate": keys * (d * 4 + 16)', ["tests/test_memory_model.py"]),
    Mutant("memory-budget-ignores-other-forms", "memoe_fast/cli.py",
           "per_edit = (len(pairs) + len(extra)) / len(pairs)", "per_edit = 1", ["tests/test_memory_model.py"]),
    Mutant("memory-prefix-of-one-group", "memoe_fast/editing/memory.py",
           "tokens_all, tokens = cached_edits * seq_tokens, micro * seq_tokens",
           "tokens_all, tokens = n_edits * seq_tokens, micro * seq_tokens", ["tests/test_memory_model.py"]),
    # datasets
    Mutant("allocator-mmap-threshold-not-raised", "memoe_fast/ops/cpu_allocator.py",
           "mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or ", "", ["tests/test_cpu_allocator.py"]),
    Mutant("plan-omits-the-allocator", "memoe_fast/editing/fast_editor.py",
           'self.plan.record("cpu_allocator_keeps_freed", *self.allocator)', "pass", ["tests/test_editor.py"]),
    Mutant("sequential-calls-restart-at-expert-0", "memoe_fast/editing/editor.py",
           "                bypass.owned_experts = owner + 1", "                pass", ["tests/test_editor.py"]),
    Mutant("unpadded-batch-not-packed", "memoe_fast/editing/packing.py",
           "    unpadded = bool((lengths == length).all())", "    unpadded = False", ["tests/test_editor.py"]),
    Mutant("stale-packed-weights-reused", "memoe_fast/editing/prepack.py",
           "        return all(_identity(lin) == made for lin, made in self._made_from.items())", "        return True",
           ["tests/test_prepack.py"]),
    Mutant("matched-input-routed-by-subject-not-key", "memoe_fast/bypass.py",
           "        if key_route is not None:\n            route = torch.where", "        if False:\n            route = torch.where",
           ["tests/test_editor.py"]),
    Mutant("balanced-keys-left-to-the-gate", "memoe_fast/editing/editor.py",
           "if owner >= 0 else bank.owners[index]", "if True else bank.owners[index]", ["tests/test_method.py"]),
    Mutant("balanced-picks-the-busiest-expert", "memoe_fast/editing/editor.py",
           "e = min(range(n), key=lambda e: (load[e], e))", "e = max(range(n), key=lambda e: (load[e], e))",
           ["tests/test_method.py"]),
    Mutant("budget-hint-never-searches", "memoe_fast/cli.py",
           "for e in range(config.num_experts - 1, config.top_k - 1, -1):",
           "for e in range(config.num_experts - 1, config.num_experts - 1, -1):", ["tests/test_memory_model.py"]),
    Mutant("context-texts-not-rotated", "memoe_fast/editing/editor.py",
           "text = f\"{contexts[(i * k + j) % len(contexts)]} {r.prompt}\"", "text = f\"{contexts[j % len(contexts)]} {r.prompt}\"",
           ["tests/test_method.py"]),
    Mutant("context-forms-get-no-keys", "memoe_fast/editing/editor.py",
           "        for text, subject, (ids, _) in self._augmented_pairs(requests):",
           "        for text, subject, (ids, _) in augmented_pairs(self.tokenizer, self.config, requests, []):",
           ["tests/test_method.py"]),
    Mutant("budget-ignores-context-forms", "memoe_fast/cli.py",
           "if config.context_prefixes > 0 else []", "if False else []", ["tests/test_memory_model.py"]),
    Mutant("zsre-rephrase-dropped", "memoe_fast/datasets.py",
           "prompt=prompt, target=target, subject=subject, rephrase=[rephrase],",
           "prompt=prompt, target=target, subject=subject, rephrase=[],", DATASETS),
    Mutant("texts-keep-empty-strings", "memoe_fast/datasets.py",
           "return [item.strip() for item in value if item.strip()]", "return [item.strip() for item in value]",
           DATASETS),
    Mutant("data-spec-case-sensitive", "memoe_fast/datasets.py",
           "kind = kind.strip().lower()", "kind = kind.strip()", DATASETS),
]


def copy_repo(dest: str) -> str:
    """The checkout's files (no .git, no caches) copied to ``dest``; the kernels link points into the copy."""
    def ignore(_dir, names):
        return {n for n in names if n in (".git", "__pycache__", ".benchmarks", "memoe_out", ".pytest_cache")
                or n.endswith(".egg-info")}

    repo = os.path.join(dest, "repo")
    shutil.copytree(ROOT, repo, symlinks=True, ignore=ignore)
    link = os.path.join(repo, "memoe_fast", "kernels")
    if os.path.islink(link):
        os.unlink(link)
    if not os.path.exists(link):
        os.symlink(os.path.join("..", "kernels"), link)
    return repo


def run_tests(repo: str, tests: list[str], budget: float, env: dict) -> tuple[str, float, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return ("pass" if proc.returncode == 0 else "fail"), time.perf_counter() - t0, tail[-1] if tail else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-kill-rate", type=float, default=None, help="fail below this fraction of killed mutants")
    p.add_argument("--budget", type=float, default=600.0, help="seconds per mutant's test run (past it: killed)")
    p.add_argument("--only", nargs="*", default=None, help="run only the mutants with these names")
    p.add_argument("--all-tests", action="store_true", help="run the whole suite (tests/) for every mutant")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--check", action="store_true",
                   help="only check that every mutant's text occurs exactly once (exit 2 naming those that do not)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    # Stopped with SIGTERM: unwind, so that the running tests are killed and the copy is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mutants = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:45s} {m.path}")
        return 0
    if args.only is not None and len(mutants) != len(args.only):
        print(f"unknown mutant(s): {sorted(set(args.only) - {m.name for m in MUTANTS})}", file=sys.stderr)
        return 2
    stale = []
    for m in mutants:
        with open(os.path.join(ROOT, m.path), encoding="utf-8") as f:
            if f.read().count(m.old) != 1:
                stale.append(m.name)
    if stale:
        print(f"mutants whose text is not found exactly once (update them): {stale}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(mutants)} mutants apply")
        return 0
    if args.min_kill_rate is None:
        p.error("--min-kill-rate is required unless --check or --list")
    with tempfile.TemporaryDirectory(prefix="memoe-mutants-") as tmp:
        repo = copy_repo(tmp)
        env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        # The shared data sets sit beside the real checkout, not beside the copy.
        env.setdefault("MEMOE_SHARED_DATA", os.path.normpath(os.path.join(ROOT, "..", "shared", "data")))
        where = subprocess.run([sys.executable, "-c", "import memoe_fast, memoe_fast.kernels as k; "
                                "print(memoe_fast.__file__); print(k.__file__)"],
                               cwd=repo, env=env, capture_output=True, text=True, check=True).stdout.split()
        if not all(os.path.realpath(w).startswith(os.path.realpath(repo) + os.sep) for w in where):
            print(f"the copy does not import its own memoe_fast: {where}", file=sys.stderr)
            return 2
        if args.all_tests:
            for m in mutants:
                m.tests = ["tests"]
        files = sorted({t for m in mutants for t in m.tests})
        status, secs, tail = run_tests(repo, files, args.budget * 3, env)
        print(f"unmutated copy: {status} in {secs:.0f} s ({tail})", flush=True)
        if status != "pass":
            return 2
        results = []
        for m in mutants:
            target = os.path.join(repo, m.path)
            with open(target, encoding="utf-8") as f:
                original = f.read()
            try:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(original.replace(m.old, m.new, 1))
                status, secs, tail = run_tests(repo, m.tests, args.budget, env)
            finally:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(original)
            killed = status != "pass"
            results.append({"name": m.name, "path": m.path, "killed": killed, "status": status, "seconds": round(secs, 1)})
            print(f"{'KILLED  ' if killed else 'SURVIVED'} {m.name:45s} {m.path:34s} {secs:6.0f} s  {tail}", flush=True)
    killed = sum(r["killed"] for r in results)
    rate = killed / len(results) if results else 0.0
    print(f"\nkilled {killed}/{len(results)} mutants: kill rate {rate:.1%} (minimum {args.min_kill_rate:.0%})")
    survived = [r["name"] for r in results if not r["killed"]]
    if survived:
        print("survived: " + ", ".join(survived))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"kill_rate": rate, "killed": killed, "total": len(results), "mutants": results}, f, indent=2)
    return 0 if rate >= args.min_kill_rate else 1


if __name__ == "__main__":
    sys.exit(main())
