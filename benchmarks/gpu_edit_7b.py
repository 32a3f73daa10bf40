"""LLaMA2-7B-shaped int8 backbone, edited within 24 GiB: peak memory and time per edit, fast vs reference.

A LLaMA2-7B configuration with random weights (nothing is downloaded): the model is built in fp16 on
the device, every linear layer of the 32 blocks is quantised to a bitsandbytes ``Linear8bitLt`` in
place (one layer at a time, so the peak is the fp16 model, 13.5 GB), and the process is capped at
24 GiB with ``torch.cuda.set_per_process_memory_fraction`` before anything is built. Then synthetic
requests of ZsRE length (prompt ~13 tokens, target ~3.5, padded to <= 40) are edited: 1000 with the
fast editor, 100 with the reference one, a few steps each, no evaluation. One CSV and one markdown
row per editor go to ``--out``.

    python benchmarks/gpu_edit_7b.py --out /tmp/edit7b              # one H100/H200, ~2-3 minutes
    python benchmarks/gpu_edit_7b.py --tiny --out /tmp/edit7b_tiny  # CPU: tiny LLaMA, proves the logic
    python benchmarks/gpu_edit_7b.py --budget                       # the memory budget table (markdown)

Offline by construction: the tokenizer is a word-level ``PreTrainedTokenizerFast`` over synthetic
words built here, and spaCy is replaced by :class:`BenchmarkOnlyNER`, which finds no entities: the
anchors come from the edited subjects (rule 1 of memoe_fast/anchors.py), which is all a batch of edit
prompts needs. bitsandbytes may come from a wheel in ``.whl/`` (benchmarks/gpu_check.sh installs it
on ``PYTHONPATH``).
"""
from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import random
import sys
import time

import torch

GIB = 2**30
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(vocab_size=3000, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
FIELDS = ("editor", "n_requests", "steps", "micro_batch", "checkpoint", "expert_dtype", "impl", "seq_len",
          "status", "edit_s", "s_per_step", "per_edit_s", "static_gib", "peak_allocated_gib", "peak_reserved_gib",
          "cap_gib", "device")


class BenchmarkOnlyNER:
    """NOT a named-entity recogniser: a stand-in for the spaCy pipeline on machines without spaCy, for
    this benchmark only. Every text has no entities and no noun chunks, so the anchor of an edit prompt
    comes from its edited subject (anchors.py rule 1) and any other text anchors on its whole string."""

    class _Doc:
        ents = ()
        noun_chunks = ()

        @staticmethod
        def has_annotation(_name):
            return False

    def __call__(self, _text):
        return self._Doc()


def build_tokenizer(vocab_size: int):
    """A word-level fast tokenizer over ``vocab_size - 4`` synthetic words (w0, w1, ...), BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for i in range(vocab_size - len(SPECIALS)):
        vocab[f"w{i}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def synthetic_requests(n: int, vocab_words: int, seed: int = 0):
    """ZsRE-length requests (the 998 ZsRE train records: prompt 11.3 tokens on average, at most 25; target
    3.2, at most 11, with a BPE tokenizer): a 2-word subject inside a 5..28-word prompt, a 1..11-word target."""
    from memoe_fast.datasets import EditRequest

    rng = random.Random(seed)
    word = lambda: f"w{rng.randrange(vocab_words)}"  # noqa: E731
    out = []
    for i in range(n):
        subject = f"{word()} {word()}"
        length = min(28, max(5, round(rng.gauss(13, 4))))
        words = [word() for _ in range(length - 2)]
        cut = rng.randrange(len(words) + 1)
        prompt = " ".join(words[:cut] + [subject] + words[cut:])
        target_len = min(11, 1 + int(rng.expovariate(1 / 2.5)))
        out.append(EditRequest(prompt=prompt, target=" ".join(word() for _ in range(target_len)), subject=subject,
                               case_id=str(i)))
    return out


def quantize_linears_(model, device) -> int:
    """Replace every ``nn.Linear`` inside the transformer blocks by a bitsandbytes ``Linear8bitLt`` holding
    the int8 quantisation of its weight (what ``load_in_8bit=True`` stores), one layer at a time."""
    import bitsandbytes as bnb
    from bitsandbytes.nn import Int8Params, Linear8bitLt

    from memoe_fast.integration import transformer_blocks

    count = 0
    for block in transformer_blocks(model):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                with torch.device("meta"):
                    q = Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                     has_fp16_weights=False, threshold=6.0)
                cb, scb, _ = bnb.functional.int8_vectorwise_quant(child.weight.data.to(device, torch.float16))
                weight = Int8Params(cb, requires_grad=False, has_fp16_weights=False)
                weight.CB, weight.SCB = cb, scb
                q.weight = weight
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.to(device), requires_grad=False)
                setattr(parent, name, q)
                del child
                count += 1
    return count


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in fp16 directly: an fp32 7B (27 GB) would not fit the cap
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    n = quantize_linears_(model, device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model, n


def memory_budget(shape: dict = LLAMA2_7B, n_requests: int = 1000, seq_len: int = 40, target_len: int = 12,
                  num_experts: int = 4, upper_blocks: int = 16, cap_gib: float = 24.0, transient_gib: float = 0.75):
    """The memory budget of editing an int8 LLaMA2-7B, per item, in GiB, and the largest micro-batch
    (sequences per forward of the fast editor) that fits under ``cap_gib``. See RESULTS.md for the terms."""
    D, F, V, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    act_block = (10 * D + 4 * F) * 2  # bytes per token per upper block kept for backward, fp16
    rows = {}
    for edt, b in (("bfloat16", 2), ("float32", 4)):
        fixed = {
            "int8 weights of the 32 blocks (+ fp32 row scales)": L * (4 * D * D + 3 * D * F) + L * (5 * D + 2 * F) * 4,
            "embedding + LM head, fp16": 2 * V * D * 2,
            f"bypass: {num_experts} experts x 3 x {D}x{F}, {edt}, + grads + Adam m, v": num_experts * 3 * D * F * b * 4,
            f"cached prefix states, {n_requests} requests x {seq_len} tokens, fp16 (+ masks, rotary)":
                n_requests * seq_len * (D * 2 + seq_len + 2 * 2 * (D // shape["num_attention_heads"])),
            "transient (int8 backward dequantises one weight; allocator slack)": transient_gib * GIB,
        }
        per_seq = {
            f"activations of the upper {upper_blocks} blocks": seq_len * upper_blocks * act_block,
            f"bypass activations ({edt})": seq_len * (3 * D + 3 * F) * b,
            "target-only logits, fp32 (logits, log-softmax, grad)": target_len * V * 4 * 3,
        }
        per_seq_ckpt = dict(per_seq)
        per_seq_ckpt[f"activations of the upper {upper_blocks} blocks"] = seq_len * (upper_blocks * D * 2 + act_block)
        free = cap_gib * GIB - sum(fixed.values())
        rows[edt] = {
            "fixed": fixed, "per_seq": per_seq, "fixed_total": sum(fixed.values()),
            "per_seq_total": sum(per_seq.values()), "max_micro_batch": int(free // sum(per_seq.values())),
            "per_seq_ckpt_total": sum(per_seq_ckpt.values()),
            "max_micro_batch_ckpt": int(free // sum(per_seq_ckpt.values())),
            "reference_per_seq": sum(per_seq.values()) - target_len * V * 12 + seq_len * V * 12,
        }
        rows[edt]["max_reference_batch"] = int(
            (cap_gib * GIB - sum(v for k, v in fixed.items() if "prefix" not in k)) // rows[edt]["reference_per_seq"])
    return rows


def budget_markdown(**kw) -> str:
    b = memory_budget(**kw)
    g = lambda x: f"{x / GIB:.2f}"  # noqa: E731
    out = ["| item | bf16 experts (GiB) | fp32 experts (GiB) |", "|---|---:|---:|"]
    for (k16, v16), (_, v32) in zip(b["bfloat16"]["fixed"].items(), b["float32"]["fixed"].items()):
        out.append(f"| {k16.replace('bfloat16', 'bf16/fp32')} | {g(v16)} | {g(v32)} |")
    out.append(f"| **fixed total** | **{g(b['bfloat16']['fixed_total'])}** | **{g(b['float32']['fixed_total'])}** |")
    for (k16, v16), (_, v32) in zip(b["bfloat16"]["per_seq"].items(), b["float32"]["per_seq"].items()):
        out.append(f"| per sequence: {k16.replace('bfloat16', 'expert dtype')} | {v16 / 2**20:.1f} MiB | {v32 / 2**20:.1f} MiB |")
    out.append(f"| **per sequence total** | **{b['bfloat16']['per_seq_total'] / 2**20:.1f} MiB** | "
               f"**{b['float32']['per_seq_total'] / 2**20:.1f} MiB** |")
    out.append(f"| **largest micro-batch in 24 GiB (fast editor)** | **{b['bfloat16']['max_micro_batch']}** | "
               f"**{b['float32']['max_micro_batch']}** |")
    out.append(f"| largest micro-batch with `checkpoint=True` | {b['bfloat16']['max_micro_batch_ckpt']} | "
               f"{b['float32']['max_micro_batch_ckpt']} |")
    out.append(f"| largest batch of the reference editor (full logits, no micro-batches) | "
               f"{b['bfloat16']['max_reference_batch']} | {b['float32']['max_reference_batch']} |")
    return "\n".join(out)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_editor(kind: str, model, tok, requests, args, device, cap_gib) -> dict:
    from memoe_fast import MEMoEConfig
    from memoe_fast.editing.editor import MEMoEEditor
    from memoe_fast.editing.fast_editor import FastMEMoEEditor
    from memoe_fast.ops.moe import resolve_impl

    config = MEMoEConfig(steps=args.steps, seed=0, num_experts=args.experts, expert_dtype=args.expert_dtype,
                         impl=args.impl)
    micro = args.micro_batch
    row = {"editor": kind, "n_requests": len(requests), "steps": args.steps, "expert_dtype": args.expert_dtype,
           "checkpoint": args.checkpoint if kind == "fast" else False, "cap_gib": cap_gib,
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    while True:
        editor = None
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if kind == "fast":
                editor = FastMEMoEEditor(model, tok, config, nlp=BenchmarkOnlyNER(), checkpoint=args.checkpoint,
                                         micro_batch=micro)
            else:
                editor = MEMoEEditor(model, tok, config, nlp=BenchmarkOnlyNER())
            row["impl"] = resolve_impl(editor.handle.bypass.impl, device)
            static = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            _sync(device)
            t0 = time.perf_counter()
            result = editor.edit(requests, mode="batch", evaluate=False)
            _sync(device)
            seconds = time.perf_counter() - t0
            steps = len(result["losses"][0])
            row.update(status="ok", micro_batch=micro if kind == "fast" else len(requests), edit_s=round(seconds, 3),
                       s_per_step=round(seconds / max(steps, 1), 3), per_edit_s=round(seconds / len(requests), 5),
                       static_gib=round(static / GIB, 2))
            if device.type == "cuda":
                row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
                row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
            return row
        except torch.cuda.OutOfMemoryError as exc:
            row["status"] = f"OOM at micro-batch {micro}: {str(exc).splitlines()[0][:120]}"
            print(f"{kind}: {row['status']}", flush=True)
            if kind != "fast" or micro <= 1:
                return row
            micro //= 2  # the budget said it fits; find what does
        finally:
            if editor is not None:
                editor.handle.remove()
            del editor
            gc.collect()


def check_fast_equals_reference(device: torch.device, n: int = 12, steps: int = 3) -> bool:
    """Both editors on one tiny fp32 LLaMA (grouped-query attention) on ``device``, the same requests:
    the fast editor's shortcuts (packed rows and their attention, the cached edited block, the last
    block at the target rows, target-only logits) must give the reference editor's losses."""
    from memoe_fast import MEMoEConfig
    from memoe_fast.editing.editor import MEMoEEditor
    from memoe_fast.editing.fast_editor import FastMEMoEEditor
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(TINY, num_key_value_heads=2)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = build_tokenizer(shape["vocab_size"])
    requests = synthetic_requests(n, shape["vocab_size"] - len(SPECIALS), seed=1)
    losses, used = {}, {}
    for name, cls in (("reference", MEMoEEditor), ("fast", FastMEMoEEditor)):
        editor = cls(model, tok, MEMoEConfig(steps=steps, lr=1e-2, seed=0, layer=1, stop_loss=0.0), nlp=BenchmarkOnlyNER())
        if name == "fast":
            capture = editor._frozen_prefix

            def spy(sub, capture=capture):
                prefix = capture(sub)
                used.update(packed=prefix.packed is not None, packed_attention="memoe_packed" in prefix.kwargs,
                            cached_edited_block=prefix.base_out is not None, last_block_at_rows=prefix.last_at_rows,
                            one_node_blocks=prefix.fused is not None)
                return prefix

            editor._frozen_prefix = spy
        try:
            losses[name] = editor.train(requests)
        finally:
            editor.handle.remove()
    worst = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(losses["reference"], losses["fast"]))
    ok = len(losses["reference"]) == len(losses["fast"]) == steps and worst < 2e-3
    print(f"fast == reference on {device.type}: {'OK' if ok else 'FAILED'} (losses {losses['reference']} vs "
          f"{losses['fast']}, worst relative difference {worst:.2e}; shortcuts taken: {used})", flush=True)
    return ok


def write_rows(out_dir: str, rows: list[dict], header: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "edit_7b.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, "edit_7b.md"), "w", encoding="utf-8") as f:
        f.write(header + "\n\n| " + " | ".join(FIELDS) + " |\n|" + "---|" * len(FIELDS) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r.get(k, "")) for k in FIELDS) + " |\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="edit_7b_out", help="folder for edit_7b.csv and edit_7b.md")
    p.add_argument("--tiny", action="store_true", help="tiny LLaMA on the CPU, few requests, no memory cap")
    p.add_argument("--budget", action="store_true", help="print the memory budget table and exit")
    p.add_argument("--n-fast", type=int, default=None, help="requests for the fast editor (default 1000; tiny 40)")
    p.add_argument("--n-reference", type=int, default=None, help="requests for the reference editor (default 100; tiny 10)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=64, help="sequences per forward of the fast editor")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing in the fast editor")
    p.add_argument("--expert-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--experts", type=int, default=4,
                   help="experts (default 4, the paper's and the library's; each one more costs ~1 GiB at 7B "
                        "with bf16 experts, their gradients and Adam state)")
    p.add_argument("--impl", default="auto", help="bypass implementation (auto: triton on CUDA)")
    p.add_argument("--cap-gib", type=float, default=24.0, help="per-process CUDA memory cap")
    args = p.parse_args(argv)
    if args.budget:
        print(budget_markdown())
        return 0
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        print(f"gpu_edit_7b: bitsandbytes is not importable ({exc}); bring its wheel in .whl/", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        print("gpu_edit_7b: no CUDA device; use --tiny on the CPU", file=sys.stderr)
        return 2
    equal = check_fast_equals_reference(device)
    shape = TINY if args.tiny else LLAMA2_7B
    n_fast = args.n_fast or (40 if args.tiny else 1000)
    n_ref = args.n_reference or (10 if args.tiny else 100)
    cap = None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        cap = args.cap_gib
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / total))
    t0 = time.perf_counter()
    model, n_int8 = build_model(shape, device, torch.float16 if device.type == "cuda" else torch.float32)
    build_s = time.perf_counter() - t0
    tok = build_tokenizer(shape["vocab_size"])
    words = shape["vocab_size"] - len(SPECIALS)
    mem = f", {torch.cuda.memory_allocated() / GIB:.2f} GiB allocated" if device.type == "cuda" else ""
    print(f"built {'tiny' if args.tiny else 'LLaMA2-7B-shaped'} model: {n_int8} int8 linears in {build_s:.1f} s{mem}",
          flush=True)
    rows = []
    for kind, n in (("fast", n_fast), ("reference", n_ref)):
        requests = synthetic_requests(n, words, seed=0)
        row = run_editor(kind, model, tok, requests, args, device, cap)
        row["seq_len"] = max(len(tok(r.prompt + " " + r.target)["input_ids"]) for r in requests)
        rows.append(row)
        print(" ".join(f"{k}={row.get(k)}" for k in FIELDS if k in row), flush=True)
    header = (f"LLaMA2-7B-shaped int8 backbone ({'tiny config, CPU' if args.tiny else 'random weights'}), "
              f"build {build_s:.1f} s, command: `python benchmarks/gpu_edit_7b.py {' '.join(argv or sys.argv[1:])}`")
    write_rows(args.out, rows, header)
    print(f"wrote {os.path.join(args.out, 'edit_7b.csv')} and edit_7b.md", flush=True)
    return 0 if equal and all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
