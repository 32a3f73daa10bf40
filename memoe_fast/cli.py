"""Command line: ``memoe-fast edit`` and ``memoe-fast generate``."""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. On a small CPU shared with any other process, spinning
# threads turn every parallel region into a stall (measured on 2 cores next to one busy process:
# elementwise ops 150x and matmuls 2x slower). It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import math
import platform
import resource
import sys
import time

EDITORS = ("reference", "fast")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("memoe-fast", "torch", "transformers", "triton", "spacy", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def peak_memory_mib() -> dict:
    """Peak resident memory of this process and, on CUDA, peak allocated GPU memory (MiB)."""
    import torch

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"peak_rss_mib": round(rss_kib / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _fmt(v) -> str:
    return "  n/a" if v is None else f"{v:5.3f}"


USER_METRICS = ("greedy_reliability", "greedy_generality", "same_subject_locality", "same_subject_greedy",
                "chat_reliability", "portability")


def format_table(result: dict) -> str:
    rows = ["| metric                | before | after |", "|-----------------------|--------|-------|"]
    for k in ("reliability", "generality", "locality") + USER_METRICS:
        if k in result["post"]:
            rows.append(f"| {k:<21} | {_fmt(result['pre'].get(k))}  | {_fmt(result['post'][k])} |")
    if "first_batch_final" in result:
        f = result["first_batch_final"]
        rows.append(f"first batch after the last: reliability {_fmt(f['reliability'])}, generality {_fmt(f['generality'])}")
    t = result["timings"]
    mem = result["memory"]
    rows.append("")
    rows.append(f"edits: {result['n_edits']} ({result['mode']}, batch size {result['batch_size']})  "
                f"editor: {result['editor']}  impl: {result['impl']}")
    rows.append(f"wall time: {t['total_s']:.1f} s (load {t['load_s']:.1f} s, edit {t['edit_s']:.1f} s, "
                f"eval {t.get('eval_pre_s', 0) + t.get('eval_post_s', 0):.1f} s)  "
                f"peak memory: {mem['peak_rss_mib']:.0f} MiB RSS"
                + (f", {mem['peak_cuda_mib']:.0f} MiB CUDA" if "peak_cuda_mib" in mem else ""))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    from .config import MEMoEConfig
    from .ops import IMPLEMENTATIONS

    d = MEMoEConfig()
    p = argparse.ArgumentParser(prog="memoe-fast", description="MEMoE model editing, fast.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("edit", help="edit a model and report Reliability / Generality / Locality before and after")
    e.add_argument("--model", default="smollm2", help="'smollm2' (embedded default), a local folder or a cached Hugging Face id")
    e.add_argument("--data", default="demo", help="demo | zsre:PATH | counterfact:PATH (EasyEdit or ROME format)")
    e.add_argument("--n", type=int, default=None, help="number of edits (default: all records)")
    e.add_argument("--mode", choices=("batch", "sequential"), default="batch")
    e.add_argument("--batch-size", type=int, default=None, help="edits per batch in sequential mode")
    e.add_argument("--preset", choices=("default", "paper"), default="default",
                   help="'paper': the MEMoE paper's setting (lr 2e-4, no anchor scope)")
    e.add_argument("--layer", type=int, default=None, help="block index (default: the middle block)")
    e.add_argument("--experts", type=int, default=None, help=f"number of experts (default {d.num_experts})")
    e.add_argument("--top-k", type=int, default=None, help=f"experts per token (default {d.top_k})")
    e.add_argument("--steps", type=int, default=None, help=f"training steps (default {d.steps})")
    e.add_argument("--lr", type=float, default=None, help=f"learning rate (default {d.lr})")
    e.add_argument("--no-scope", action="store_true", help="route every input through the experts (no anchor scope)")
    e.add_argument("--positions", choices=("all", "after_subject"), default=None,
                   help=f"tokens the experts act on in an in-scope input (default {d.bypass_positions})")
    e.add_argument("--key-threshold", type=float, default=None,
                   help=f"key gate: cosine an input's token needs to an edit prompt's key (default {d.key_threshold})")
    e.add_argument("--key-subject-rank", type=int, default=None,
                   help="key gate: directions of the edited subject's other prompts removed before the cosine "
                        f"(0: plain cosine; default {d.key_subject_rank})")
    e.add_argument("--key-span", choices=("whole_input", "after_match"), default=None,
                   help=f"what a key match switches on (default {d.key_span})")
    e.add_argument("--negatives", type=int, default=None,
                   help=f"same-subject negative prompts per edit, trained to keep the unedited outputs (default {d.negatives})")
    e.add_argument("--update-batch", type=int, default=None,
                   help=f"edits per optimiser update, 0: all at once (default {d.update_batch})")
    e.add_argument("--sequential-experts", choices=("shared", "per_batch"), default=None,
                   help=f"sequential mode: shared experts, or one expert per batch with the earlier ones frozen (default {d.sequential_experts})")
    e.add_argument("--expert-assignment", choices=("gate", "balanced"), default=None,
                   help=f"which expert a new subject goes to: the gate's choice from its anchor, or the expert "
                        f"holding the fewest edits (default {d.expert_assignment})")
    e.add_argument("--context-prefixes", type=int, default=None,
                   help="also train each edit after this many short texts the unedited model writes, each with its "
                        f"own key (0: off; default {d.context_prefixes})")
    e.add_argument("--no-user-metrics", action="store_true",
                   help="skip the metrics as users meet the model (greedy, same-subject, chat, portability)")
    e.add_argument("--resume", action="store_true",
                   help="sequential mode: continue a stopped run from its last finished batch (OUT/checkpoint)")
    e.add_argument("--replay", action="store_true",
                   help="sequential mode: train each batch together with the earlier edits (no forgetting)")
    e.add_argument("--impl", choices=IMPLEMENTATIONS, default="auto", help="bypass implementation")
    e.add_argument("--editor", choices=EDITORS, default="fast", help="fast (cached frozen prefix) or reference editor")
    e.add_argument("--micro-batch", type=int, default=64, help="fast editor: sequences per forward (gradients accumulate)")
    e.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="fast editor: the largest micro-batch whose predicted peak memory stays under SIZE "
                        "(e.g. 22GiB; memoe_fast.editing.memory), instead of --micro-batch")
    e.add_argument("--checkpoint", action="store_true", help="fast editor: recompute the upper blocks in backward (less memory)")
    e.add_argument("--no-prepack", action="store_true",
                   help="fast editor, CPU: no packed weight copies for oneDNN (less memory, ~5%% slower steps)")
    e.add_argument("--load-in-8bit", action="store_true", help="load the backbone in 8-bit (bitsandbytes)")
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    e.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default="memoe_out", help="output folder: results.json and edits/")
    e.add_argument("--no-progress", action="store_true")
    g = sub.add_parser("generate", help="continue a prompt with an edited model")
    g.add_argument("--edits", required=True, help="an edits folder written by `memoe-fast edit` (OUT/edits)")
    g.add_argument("--model", default=None, help="override the model recorded with the edits")
    g.add_argument("--max-new-tokens", type=int, default=20)
    g.add_argument("--compare", action="store_true", help="also print the unedited model's continuation")
    g.add_argument("--device", default=None)
    g.add_argument("prompt", nargs="+")
    return p


def _config_from_args(args):
    from .config import MEMoEConfig

    over = {"seed": args.seed, "impl": args.impl}
    given = []  # the options set on the command line, for the error message
    for key, flag, val in (("layer", "--layer", args.layer), ("num_experts", "--experts", args.experts),
                           ("top_k", "--top-k", args.top_k), ("steps", "--steps", args.steps), ("lr", "--lr", args.lr),
                           ("bypass_positions", "--positions", args.positions),
                           ("negatives", "--negatives", args.negatives),
                           ("update_batch", "--update-batch", args.update_batch),
                           ("sequential_experts", "--sequential-experts", args.sequential_experts),
                           ("expert_assignment", "--expert-assignment", args.expert_assignment),
                           ("context_prefixes", "--context-prefixes", args.context_prefixes),
                           ("key_threshold", "--key-threshold", args.key_threshold),
                           ("key_subject_rank", "--key-subject-rank", args.key_subject_rank),
                           ("key_span", "--key-span", args.key_span)):
        if val is not None:
            over[key] = val
            given.append(f"{flag} {val}")
    if args.no_scope:
        over["anchor_scope"] = False
    if args.replay:
        over["replay"] = True
    try:
        return MEMoEConfig.paper(**over) if args.preset == "paper" else MEMoEConfig(**over)
    except ValueError as exc:
        raise ValueError(f"{' '.join(given) or f'--preset {args.preset}'}: {exc}") from None


def cmd_edit(args) -> int:
    import torch

    from .datasets import load_requests
    from .integration import resolve_layer
    from .io import atomic_write_json
    from .models import load_model, model_label
    from .ops import resolve_impl
    from .preflight import preflight

    preflight(args.model, load_in_8bit=args.load_in_8bit)  # every dependency, before any work
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.micro_batch < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    if args.mode == "sequential" and not args.batch_size:
        raise ValueError("--mode sequential needs --batch-size")
    budget = _memory_budget(args)
    config = _config_from_args(args)
    requests = load_requests(args.data, args.n)  # bad data fails here, before the model loads
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    progress = not args.no_progress
    if progress:
        print(f"loading {model_label(args.model)} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, dtype=args.dtype, load_in_8bit=args.load_in_8bit, device=args.device)
    load_s = time.perf_counter() - t0
    resolve_layer(model, config.layer, name="--layer")  # needs the model; before anything else uses the layer
    if args.editor == "fast":
        from .editing.fast_editor import FastMEMoEEditor as Editor
    else:
        from .editing.editor import MEMoEEditor as Editor
    extra = ({"micro_batch": args.micro_batch, "checkpoint": args.checkpoint, "prepack": not args.no_prepack}
             if args.editor == "fast" else {})
    memory_model = None
    if budget is not None:
        memory_model = pick_for_budget(budget, model, tokenizer, requests, config, args)
        extra["micro_batch"] = memory_model["micro_batch"]
    editor = Editor(model, tokenizer, config, progress=progress, **extra)
    out = os.path.abspath(args.out)
    checkpoint = os.path.join(out, "checkpoint") if args.mode == "sequential" else None
    if args.resume and not (checkpoint and os.path.exists(os.path.join(checkpoint, "memoe.json"))):
        raise ValueError(f"--resume: no sequential checkpoint in {os.path.join(out, 'checkpoint')}")
    result = editor.edit(requests, mode=args.mode, batch_size=args.batch_size, user_metrics=not args.no_user_metrics,
                         checkpoint_dir=checkpoint, resume=args.resume)
    result["timings"]["load_s"] = load_s
    result["timings"]["total_s"] = time.perf_counter() - t0
    result["timings"]["per_edit_s"] = result["timings"]["edit_s"] / len(requests)
    result.update({
        "model": args.model, "data": args.data, "editor": args.editor, "editor_options": extra,
        "prepacked": bool(getattr(editor, "prepacked_last", False)), "load_in_8bit": args.load_in_8bit,
        "plan": editor.plan.to_dict() if hasattr(editor, "plan") else None,
        "impl": resolve_impl(editor.handle.bypass.impl, editor.device), "config": config.to_dict(), "layer": editor.handle.layer,
        "memory": peak_memory_mib(), "versions": _versions(), "device": str(editor.device),
    })
    if memory_model is not None:
        result["memory_model"] = memory_model
    editor.handle.save(os.path.join(out, "edits"), extra={"model": args.model, "load_in_8bit": args.load_in_8bit},
                       requests=requests)
    atomic_write_json(os.path.join(out, "results.json"), result)
    print(format_table(result))
    print(f"wrote {os.path.join(out, 'results.json')} and {os.path.join(out, 'edits')}")
    return 0


def _memory_budget(args) -> int | None:
    """``--memory-budget`` in bytes (checked before the model loads)."""
    if args.memory_budget is None:
        return None
    from .editing.memory import parse_size

    if args.editor != "fast":
        raise ValueError("--memory-budget picks the fast editor's micro-batch: it needs --editor fast")
    try:
        return parse_size(args.memory_budget)
    except ValueError as exc:
        raise ValueError(f"--memory-budget: {exc}") from None


def pick_for_budget(budget: int, model, tokenizer, requests, config, args) -> dict:
    """The micro-batch the memory model picks for ``budget``, with its predicted peak (for results.json)."""
    from .editing.editor import augmented_pairs, write_context_texts
    from .editing.memory import BackboneShape, pick_micro_batch, predict_peak
    from .metrics import encode_pair

    try:
        shape = BackboneShape.from_model(model)
    except AttributeError as exc:
        raise ValueError(f"--memory-budget: the memory model covers LLaMA-style backbones ({exc})") from None
    pairs = [encode_pair(tokenizer, r.prompt, r.target) for r in requests]
    # Edits are trained in other forms too, each with its key: question-shaped ones as a user turn in the chat
    # template (chat_augment), and each after context texts (context_prefixes; the model is not edited yet).
    contexts = write_context_texts(model, tokenizer, config.context_tokens) if config.context_prefixes > 0 else []
    extra = [c[2] for c in augmented_pairs(tokenizer, config, requests, contexts)]
    per_edit = (len(pairs) + len(extra)) / len(pairs)
    # Sequences trained together: the batch (sequential: one batch, or all seen ones with replay), split by
    # --update-batch, each edit with its other forms and up to `negatives` same-subject prompts.
    batch = len(requests) if args.mode == "batch" or config.replay else min(args.batch_size, len(requests))
    n = math.ceil((min(batch, config.update_batch) if config.update_batch > 0 else batch) * per_edit) * (1 + config.negatives)
    seqs = pairs + extra
    key_gate = config.key_threshold is not None
    kw = dict(layer=config.layer, prompt_tokens=sum(len(p) for p, _ in seqs) / len(seqs),
              target_tokens=sum(len(t) for _, t in seqs) / len(seqs), num_experts=config.num_experts,
              expert_dtype=config.expert_dtype, device=next(model.parameters()).device.type,
              prepack=not args.no_prepack,
              gate_trains=config.aux_loss_weight > 0 or not (config.top_k == 1 and config.renormalize),
              # Keys and subspaces of every edit of the run (sequential runs keep the earlier batches').
              keys=(sum(1 for r in requests if r.subject) + len(extra)) if key_gate else 0,
              key_subjects=len({r.subject for r in requests if r.subject}) if key_gate else 0,
              key_rank=min(config.key_subject_rank, shape.hidden // 4) if key_gate else 0,
              # The frozen prefixes of every update group of a batch stay cached while it trains.
              cached_edits=math.ceil(batch * per_edit) * (1 + config.negatives))
    try:
        micro = pick_micro_batch(budget, shape, n, **kw)
    except ValueError as exc:
        # The experts and their Adam state are the term a user can shrink: name the largest count that fits.
        for e in range(config.num_experts - 1, config.top_k - 1, -1):
            try:
                fit = pick_micro_batch(budget, shape, n, **dict(kw, num_experts=e))
            except ValueError:
                continue
            peak = predict_peak(shape, n, micro_batch=fit, **dict(kw, num_experts=e)).total / 2**30
            raise ValueError(f"--memory-budget: {exc} with {config.num_experts} experts; --experts {e} fits "
                             f"(micro-batch {fit}, {peak:.2f} GiB predicted)") from None
        raise ValueError(f"--memory-budget: {exc}") from None
    pred = predict_peak(shape, n, micro_batch=micro, **kw)
    return {"budget_bytes": budget, "micro_batch": micro, "predicted_peak_bytes": pred.total,
            "predicted_peak_gib": round(pred.total / 2**30, 3), "sequences": n, "prediction": pred.to_dict()}


def cmd_generate(args) -> int:
    import torch

    from .config import MEMoEConfig
    from .integration import apply_memoe, read_edit_meta
    from .models import load_model
    from .preflight import preflight

    meta = read_edit_meta(args.edits)
    preflight(args.model or meta.get("model", "smollm2"), load_in_8bit=bool(meta.get("load_in_8bit")))
    model, tokenizer = load_model(args.model or meta.get("model", "smollm2"),
                                  load_in_8bit=bool(meta.get("load_in_8bit")), device=args.device)
    config = MEMoEConfig.from_dict(meta["config"])
    handle = apply_memoe(model, config, tokenizer)
    handle.load_weights(args.edits)
    prompt = " ".join(args.prompt)
    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)

    def run() -> str:
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    edited = run()
    if args.compare:
        with handle.disabled():
            print(f"unedited: {prompt}{run()}")
        print(f"edited:   {prompt}{edited}")
    else:
        print(prompt + edited)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_edit(args) if args.command == "edit" else cmd_generate(args)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError, FloatingPointError) as exc:
        print(f"memoe-fast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
