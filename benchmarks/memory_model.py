"""The fast editor's memory model (``memoe_fast.editing.memory``) against measured CPU peaks, and its
LLaMA-2-7B 8-bit prediction.

    nice -n 19 env OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/memory_model.py            # table + RESULTS.md
    PYTHONPATH=. python benchmarks/memory_model.py --predict-only                               # 7B table only
    PYTHONPATH=. python benchmarks/memory_model.py --measure '{"case": "tiny", ...}'            # one measurement (JSON)

How a peak is measured: every case runs in a fresh Python process. Once the model is loaded (and the
tokenizer, requests and the rest), that is the *baseline*; then the editor edits (``evaluate=False``,
at least two steps, so that Adam's state exists) while a thread samples the process's resident
*anonymous* memory (``/proc/self/statm``: resident minus file-backed pages) every 2 ms; torch releases
the GIL inside its ops and in backward, so the samples land inside them. The model predicts the
**increase** of that peak over the baseline (experts, optimiser state, prefix, activations, packed
copies); the backbone's weights are compared to the bytes of the model's tensors. The kernel's
high-water mark ``VmHWM`` (reset to the baseline through ``/proc/self/clear_refs``) is reported too, but
it counts file-backed pages (the shared libraries' code), which a loaded machine evicts and reloads
during a long run, so it can drift by hundreds of MiB either way. glibc's malloc is pinned to mmap
every allocation of 64 KiB or more (``MALLOC_MMAP_THRESHOLD_``): freed tensors then leave the resident
set at once, so it tracks the live tensors instead of the heap's history (the editors' own allocator
setting, :mod:`memoe_fast.ops.cpu_allocator`, is turned off for the same reason). The torch profiler's memory
events were not used: they record every allocation of a run and change the timing of what they watch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
START, END = "<!-- memory-model:start -->", "<!-- memory-model:end -->"
MiB, GiB = 2**20, 2**30

LLAMA7B_FEW = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                   num_key_value_heads=32, max_position_embeddings=512, rms_norm_eps=1e-5)
TINY = dict(vocab_size=3000, hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-5)

# The validation cases: (label, spec). Small on purpose: the machine is shared.
CASES = [
    ("SmolLM2-135M fp32, 30 demo edits, E=4, micro-batch 64",
     dict(case="smollm2", n=30, experts=4, micro_batch=64, steps=3)),
    ("SmolLM2-135M fp32, 30 demo edits, E=4, micro-batch 8",
     dict(case="smollm2", n=30, experts=4, micro_batch=8, steps=3)),
    ("SmolLM2-135M bf16 (autograd upper blocks), 43 demo edits, E=4, micro-batch 43",
     dict(case="smollm2", dtype="bfloat16", n=43, experts=4, micro_batch=43, steps=3)),
    ("LLaMA-2-7B-shaped, 4 blocks int8 (bitsandbytes), layer 1, 8 edits, E=2 bf16, micro-batch 4",
     dict(case="llama7b", layers=4, layer=1, n=8, experts=2, expert_dtype="bfloat16", micro_batch=4, steps=2)),
    ("LLaMA-2-7B-shaped, 2 blocks int8 (bitsandbytes), layer 0, 2 edits, E=1 fp32, micro-batch 2",
     dict(case="llama7b", layers=2, layer=0, n=2, experts=1, expert_dtype="float32", micro_batch=2, steps=2)),
]


def proc_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process, in bytes."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


def anon_bytes() -> int:
    """Resident anonymous memory (``/proc/self/statm``: resident minus file-backed and shared pages)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


class AnonPeak:
    """The peak of :func:`anon_bytes` while running, sampled every ``interval`` seconds by a thread (torch
    releases the GIL inside its ops and in backward, so the thread samples while they run)."""

    def __init__(self, interval: float = 0.002):
        import threading

        self.interval, self.peak, self._stop = interval, anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_bytes())


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def _tiny_or_7b_model(spec: dict):
    """A random LLaMA from ``spec`` (``TINY`` or the 7B shape with ``layers`` blocks), the word-level
    tokenizer and synthetic ZsRE-length requests of ``benchmarks/gpu_edit_7b.py``; int8 when asked."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, HERE)
    from gpu_edit_7b import BenchmarkOnlyNER, build_tokenizer, quantize_linears_, synthetic_requests

    shape = {**(TINY if spec["case"] == "tiny" else LLAMA7B_FEW), **spec.get("dims", {})}
    cfg = LlamaConfig(**shape, num_hidden_layers=spec["layers"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    if spec.get("int8", spec["case"] == "llama7b"):
        quantize_linears_(model, torch.device("cpu"))
    for p in model.parameters():
        p.requires_grad_(False)
    tok = build_tokenizer(cfg.vocab_size)
    requests = synthetic_requests(spec["n"], cfg.vocab_size - 4, seed=0)
    return model, tok, requests, BenchmarkOnlyNER()


class _NoEntities:
    ents = ()
    noun_chunks = ()

    def has_annotation(self, _name):
        return False


def measure(spec: dict) -> dict:
    """One measurement, in this process (call it in a fresh one: see the module docstring)."""
    import gc
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    from memoe_fast import MEMoEConfig
    from memoe_fast.editing.fast_editor import FastMEMoEEditor
    from memoe_fast.editing.memory import BackboneShape, predict_peak
    from memoe_fast.metrics import encode_pair

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    before = proc_status()["VmRSS"]
    if spec["case"] == "smollm2":
        from memoe_fast.datasets import load_demo
        from memoe_fast.models import load_model

        model, tok = load_model(device="cpu", dtype=spec.get("dtype", "float32"))
        requests = load_demo(spec["n"])
        nlp = lambda _text: _NoEntities()  # noqa: E731  (no spaCy pipeline in the measured process)
    else:
        model, tok, requests, nlp = _tiny_or_7b_model(spec)
    # Loaded weights may be pages of the mmapped checkpoint, resident only once read: copy them into
    # memory of their own, so that the baseline holds the whole backbone. Not the int8 weights: a
    # bitsandbytes weight also keeps its bytes as ``CB`` (moved to the layer's state on the first
    # forward), so a copy would count them twice in the baseline and drop out during the edit.
    with torch.no_grad():
        for prm in model.parameters():
            if prm.dtype != torch.int8:
                prm.data = prm.data.clone()
    # Measured on the editor's full-row path: every in-scope token through the experts, no chat-form
    # pairs, no key gate. The model counts the chat forms as sequences and the key gate's store
    # (predict_peak's keys/key_subjects), but not the defaults' suffix-only run above the edited block
    # (less activation memory, plus cached keys/values; benchmarks/RESULTS.md, "Memory model").
    config = MEMoEConfig(num_experts=spec["experts"], steps=spec["steps"], expert_dtype=spec.get("expert_dtype"),
                         layer=spec.get("layer"), stop_loss=0.0, seed=0, bypass_positions="all",
                         key_threshold=None, chat_augment=False)
    pairs = [encode_pair(tok, r.prompt, r.target) for r in requests]
    prompt = sum(len(p) for p, _ in pairs) / len(pairs)
    target = sum(len(t) for _, t in pairs) / len(pairs)
    # Padding of the packed attention: sequences sorted by length, then cut into micro-batches.
    lengths = sorted(len(p) + len(t) - 1 for p, t in pairs)
    mb = spec["micro_batch"]
    padded = sum(len(lengths[i:i + mb]) * max(lengths[i:i + mb]) for i in range(0, len(lengths), mb))
    padding = padded / sum(lengths)
    trace = []
    if spec.get("trace"):
        def note(opt, *_):
            st = proc_status()
            trace.append((len(trace), st["VmRSS"] // MiB, st["VmHWM"] // MiB, anon_bytes() // MiB))
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(note)
        register_optimizer_step_post_hook(note)
    gc.collect()
    base, base_anon = proc_status()["VmRSS"], anon_bytes()
    reset_peak()
    t0 = time.perf_counter()
    sampler = AnonPeak().__enter__()
    editor = FastMEMoEEditor(model, tok, config, nlp=nlp, micro_batch=mb, prepack=spec.get("prepack", True))
    if spec.get("trace"):
        trace.append(("editor", proc_status()["VmRSS"] // MiB, anon_bytes() // MiB))
        prepare = editor.prepare

        def traced_prepare(requests):
            prepare(requests)
            trace.append(("prepared", proc_status()["VmRSS"] // MiB, anon_bytes() // MiB))

        editor.prepare = traced_prepare
    editor.edit(requests, mode="batch", evaluate=False)
    sampler.__exit__()
    seconds = time.perf_counter() - t0
    peak = proc_status()["VmHWM"]
    shape = BackboneShape.from_model(model)
    inputs = dict(n_edits=len(requests), layer=editor.handle.layer, micro_batch=mb, prompt_tokens=prompt,
                  target_tokens=target, num_experts=spec["experts"], expert_dtype=spec.get("expert_dtype"),
                  device="cpu", prepack=bool(editor.prepacked_last), padding=padding)
    plan = editor.plan.to_dict()
    return {"spec": spec, "loaded_bytes": base - before, "baseline_rss": base, "peak_rss": peak,
            "rss_increase_bytes": peak - base, "increase_bytes": sampler.peak - base_anon,
            "weights_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]), "edit_s": round(seconds, 1), "prompt_tokens": prompt,
            "target_tokens": target, "padding": padding, "prepacked": bool(editor.prepacked_last),
            "one_node_blocks": plan.get("one_node_blocks", {}).get("taken"),
            "shape": shape.__dict__, "inputs": inputs, "trace": trace}


def predict(r: dict) -> dict:
    """The model's prediction for a measured run, from the run's shape and inputs."""
    from memoe_fast.editing.memory import BackboneShape, predict_peak

    inputs = dict(r["inputs"])
    return predict_peak(BackboneShape(**r["shape"]), inputs.pop("n_edits"), **inputs).to_dict()


def _machine() -> str:
    """The CPU model, core count and date, for the validation table."""
    import datetime
    import platform

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical cores, {datetime.date.today().isoformat()}"


def measure_in_subprocess(spec: dict, timeout: float = 1800) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MEMOE_FAST_KEEP_FREED": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def validation_table(results: list[tuple[str, dict]]) -> str:
    rows = ["| case | measured increase, anonymous (MiB) | measured increase, VmHWM (MiB) | predicted increase (MiB) | "
            "error vs anonymous | peaking moment | weights: tensors / predicted (MiB) | absolute VmHWM (MiB) | edit (s) |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for label, r in results:
        p = r["prediction"]
        err = (p["increase_bytes"] - r["increase_bytes"]) / r["increase_bytes"]
        experts = p["terms"]["experts_and_gate"]  # the model's tensors are counted after the bypass is applied
        rows.append(f"| {label} | {r['increase_bytes'] / MiB:.0f} | {r['rss_increase_bytes'] / MiB:.0f} | "
                    f"{p['increase_bytes'] / MiB:.0f} | {err:+.1%} | {p['phase']} | "
                    f"{(r['weights_bytes'] - experts) / MiB:.0f} / {p['terms']['backbone_weights'] / MiB:.0f} | "
                    f"{r['peak_rss'] / MiB:.0f} | {r['edit_s']} |")
    return "\n".join(rows)


def llama7b_table(budget: int = 22 * GiB, edits=(30, 100, 1000), experts: int = 4, expert_dtype: str = "bfloat16",
                  prompt_tokens: float = 12.3, target_tokens: float = 3.2, chat_tokens: float = 9.0,
                  update_batch: int = 50, key_rank: int = 32) -> str:
    """The full LLaMA-2-7B (int8 blocks, fp16 embeddings and head) on CUDA with the library's defaults: each
    question-shaped edit also trained in chat form (``chat_tokens`` more prompt tokens), ``update_batch``
    edits per optimiser update (every group's prefix cached), the key gate's keys and subject subspaces;
    each term at the micro-batch picked for ``budget``."""
    from memoe_fast.editing.memory import LLAMA2_7B, pick_micro_batch, predict_peak

    kw = dict(num_experts=experts, expert_dtype=expert_dtype, device="cuda",
              prompt_tokens=prompt_tokens + chat_tokens / 2, target_tokens=target_tokens)
    preds = []
    for n in edits:
        per_update = 2 * min(n, update_batch)  # each edit and its chat form
        run = dict(kw, keys=2 * n, key_subjects=n, key_rank=key_rank, cached_edits=2 * n)
        mb = pick_micro_batch(budget, LLAMA2_7B, per_update, **run)
        preds.append(predict_peak(LLAMA2_7B, per_update, micro_batch=mb, **run))
    head = "| term (GiB) | " + " | ".join(f"{n} edits" for n in edits) + " |"
    rows = [head, "|---|" + "---:|" * len(edits)]
    rows.append("| **micro-batch picked** | " + " | ".join(f"**{p.micro_batch}**" for p in preds) + " |")
    for term in preds[0].terms:
        rows.append(f"| {term} | " + " | ".join(f"{p.terms[term] / GiB:.2f}" for p in preds) + " |")
    rows.append("| **predicted peak** | " + " | ".join(f"**{p.total / GiB:.2f}**" for p in preds) + " |")
    rows.append("| peaking moment | " + " | ".join(p.phase for p in preds) + " |")
    return "\n".join(rows)


def write_results(text: str, path: str = os.path.join(HERE, "RESULTS.md")) -> None:
    with open(path, encoding="utf-8") as f:
        old = f.read()
    block = f"{START}\n{text.strip()}\n{END}"
    if START in old and END in old:
        new = old[:old.index(START)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", help="one measurement spec (JSON), run in this process; prints JSON")
    p.add_argument("--predict-only", action="store_true", help="print the 7B prediction table only")
    p.add_argument("--cases", default=None, help="comma-separated case indices (default: all)")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--save", default=None, help="also write the raw measurements to this JSON file")
    p.add_argument("--load", default=None, help="render the tables from measurements saved with --save")
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return 0
    table7b = llama7b_table()
    if args.predict_only:
        print(table7b)
        return 0
    chosen = CASES if args.cases is None else [CASES[int(i)] for i in args.cases.split(",")]
    results = []
    if args.load:
        with open(args.load, encoding="utf-8") as f:
            results = [tuple(x) for x in json.load(f)]
    for label, spec in ([] if args.load else chosen):
        r = measure_in_subprocess(spec)
        results.append((label, r))
        if args.save:
            with open(args.save, "w", encoding="utf-8") as f:
                json.dump(results, f)
    for label, r in results:
        r["prediction"] = predict(r)
        print(f"{label}: measured +{r['increase_bytes'] / MiB:.0f} MiB, predicted "
              f"+{r['prediction']['increase_bytes'] / MiB:.0f} MiB ({r['prediction']['phase']})", flush=True)
    val = validation_table(results)
    text = "\n".join([
        "## Memory model of the fast editor: measured on the CPU, predicted for LLaMA-2-7B 8-bit", "",
        "`memoe_fast.editing.memory.predict_peak` adds up the terms of one editing run (backbone, packed copies, "
        "experts, Adam state, cached prefix of every micro-batch, one micro-batch's saved activations, the LM head at "
        "the target rows, gradient buffers) at the two moments a step can peak. Validation: each case in a fresh "
        "process, peak = `VmHWM` after resetting it to the loaded model's RSS (`/proc/self/clear_refs`), glibc pinned "
        "to mmap (`MALLOC_MMAP_THRESHOLD_=65536`); the model predicts the increase over the loaded model (the weights "
        "are compared to the RSS the load added). Error = (predicted - measured) / measured.", "",
        "    nice -n 19 env OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/memory_model.py", "",
        val, "", f"Machine: {_machine()}.", "",
        "LLaMA-2-7B, int8 blocks (bitsandbytes), fp16 embeddings/head/hidden states, CUDA (Triton experts), E=4 "
        "bf16 experts (`MEMoEConfig(expert_dtype=\"bfloat16\")`; the CLI's default `expert_dtype=None` gives fp32 "
        "experts on an int8 host), ZsRE-length requests (12.3 prompt + 3.2 target tokens), with the library's "
        "defaults: each question also trained in chat form (assumed 9 tokens longer), 50 edits (100 sequences) per "
        "optimiser update with every group's frozen prefix cached, and the key gate's store (2n keys in two fp32 "
        "copies, a 32-direction fp32 subspace per subject); micro-batch picked by `pick_micro_batch` for a 22 GiB "
        "budget. Predicted, not measured (no GPU); full-row activations (the defaults run only each sequence's "
        "suffix above the edited block, so that term is an upper bound):", "",
        "    PYTHONPATH=. python benchmarks/memory_model.py --predict-only", "",
        table7b,
    ])
    print(text)
    if not args.no_write:
        write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
