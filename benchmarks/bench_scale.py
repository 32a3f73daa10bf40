"""Editing at scale: time per edit against the number of edits, fast and reference editor, same edits.

    pytest benchmarks/bench_scale.py --benchmark-only --benchmark-json=bench.json
    MEMOE_BENCH_SCALE=30,100,300,1000 pytest benchmarks/bench_scale.py --benchmark-only   # the full curve

What is timed: ``editor.edit(requests, evaluate=False)`` (training only, the library's default recipe)
on the first N records of the ZsRE train split (``../shared/data``; the benchmark skips without it).
The default suite runs N = 30 and 100 with both editors; ``MEMOE_BENCH_SCALE`` sets the Ns and
``MEMOE_BENCH_SCALE_REFERENCE_MAX`` the largest N the (slow) reference editor runs (default 100).
``extra_info`` records the time per edit and the steps taken; with update groups (``update_batch``)
the time per edit should fall as N grows: the fixed cost per batch is shared and learned groups stop
costing work.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from memoe_fast import MEMoEConfig
from memoe_fast.datasets import load_requests
from memoe_fast.editing.editor import MEMoEEditor
from memoe_fast.editing.fast_editor import FastMEMoEEditor
from memoe_fast.testing import shared_data_path

SIZES = [int(n) for n in os.environ.get("MEMOE_BENCH_SCALE", "30,100").split(",")]
REFERENCE_MAX = int(os.environ.get("MEMOE_BENCH_SCALE_REFERENCE_MAX", 100))
PROVIDERS = {"fast": FastMEMoEEditor, "reference": MEMoEEditor}
_PER_EDIT: dict[tuple[str, int], float] = {}


@pytest.fixture(scope="module")
def zsre_train():
    path = shared_data_path("zsre_mend_train-1k.json")
    if path is None:
        pytest.skip("zsre_mend_train-1k.json not found in ../shared/data (the shared data sets are not shipped)")
    return load_requests(f"zsre:{path}", max(SIZES))


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from memoe_fast.models import load_model

    return load_model("smollm2", device="cpu")


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("n", SIZES)
def test_time_per_edit(benchmark, model_and_tokenizer, zsre_train, n, provider):
    if provider == "reference" and n > REFERENCE_MAX:
        pytest.skip(f"the reference editor runs up to N={REFERENCE_MAX} (MEMOE_BENCH_SCALE_REFERENCE_MAX)")
    model, tok = model_and_tokenizer
    requests = zsre_train[:n]
    benchmark.group = f"edit N edits ({provider})"
    out = {}

    def run():
        editor = PROVIDERS[provider](model, tok, MEMoEConfig(seed=0))
        try:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            result = editor.edit(requests, evaluate=False)
            out["s"] = time.perf_counter() - t0
            out["steps"] = [len(losses) for losses in result["losses"]]
            out["final_loss"] = result["losses"][-1][-1]
        finally:
            editor.handle.remove()

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    per_edit = out["s"] / n
    _PER_EDIT[(provider, n)] = per_edit
    benchmark.extra_info.update({"n_edits": n, "provider": provider, "per_edit_s": per_edit,
                                 "steps": out["steps"], "final_loss": out["final_loss"]})
    print(f"\n{provider} N={n}: {out['s']:.1f} s, {per_edit:.3f} s per edit, steps {out['steps']}, "
          f"final loss {out['final_loss']:.4f}")
    smallest = min(SIZES)
    if n > smallest and (provider, smallest) in _PER_EDIT:
        print(f"{provider}: per edit at N={n} / at N={smallest}: {per_edit / _PER_EDIT[(provider, smallest)]:.2f}")
