"""Rerun the evaluation table and write it into README.md (between the eval-table markers).

    python benchmarks/eval_table.py                    # every row (long: the 1000-edit rows take minutes each)
    python benchmarks/eval_table.py --rows zsre-30     # some rows; the others keep their last results
    python benchmarks/eval_table.py --reuse            # only rebuild the table from the saved results.json files

Each row is one ``memoe-fast edit`` command on a test split, run with the library's defaults; its
results.json goes to ``eval_runs/<row>/`` and the table quotes the command. The test splits are read
from ``../shared/data`` (never used to choose hyperparameters).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "../shared/data"
ZSRE = f"zsre:{DATA}/zsre_mend_eval_portability_gpt4.json"
CF = f"counterfact:{DATA}/counterfact-val.json"
ROWS = {
    "demo": "memoe-fast edit",
    "zsre-30": f"memoe-fast edit --data {ZSRE} --n 30",
    "zsre-1000-seq": f"memoe-fast edit --data {ZSRE} --n 1000 --mode sequential --batch-size 100",
    "zsre-1000": f"memoe-fast edit --data {ZSRE} --n 1000",
    "cf-30": f"memoe-fast edit --data {CF} --n 30",
    "cf-1000": f"memoe-fast edit --data {CF} --n 1000",
}
METRICS = ("reliability", "generality", "locality", "same_subject_locality", "same_subject_greedy",
           "greedy_reliability", "greedy_generality", "chat_reliability", "portability")
HEAD = ("Rel", "Gen", "Loc", "same-subj. Loc", "same-subj. greedy", "greedy Rel", "greedy Gen", "chat Rel",
        "portability")
START, END = "<!-- eval-table:start -->", "<!-- eval-table:end -->"


def run(name: str, out_root: str) -> None:
    out = os.path.join(out_root, name)
    cmd = shlex.split(ROWS[name]) + ["--out", out, "--no-progress"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "memoe_fast.cli", *cmd[1:]], cwd=ROOT, check=True)


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def table(out_root: str, previous: str = "") -> str:
    """The table's rows from ``out_root/<row>/results.json``; a row without one keeps its line from
    ``previous`` (the table now in the README), so rerunning some rows never drops the others."""
    lines = ["| command | " + " | ".join(HEAD) + " | edit time (per edit) |",
             "|---|" + "---:|" * (len(HEAD) + 1)]
    kept = {}
    for line in previous.splitlines():
        for name, command in ROWS.items():
            if line.startswith(f"| `{command}`") and name not in kept:
                kept[name] = line
    for name, command in ROWS.items():
        path = os.path.join(out_root, name, "results.json")
        if not os.path.exists(path):
            if name in kept:
                lines.append(kept[name])
            continue
        r = json.load(open(path))
        pre, post = r["pre"], r["post"]
        cells = []
        for k in METRICS:
            if k == "portability" and post.get(k) is not None:
                cells.append(f"{_f(pre.get(k))} → {_f(post[k])}")
            else:
                cells.append(_f(post.get(k)))
        t = r["timings"]
        extra = ""
        if "first_batch_final" in r:
            extra = f"<br>first batch at the end: Rel {_f(r['first_batch_final']['reliability'])}"
            pb = r.get("per_batch") or []
            if len(pb) > 1:
                extra += f"; train time batch 10 / batch 1: {pb[-1]['train_s'] / pb[0]['train_s']:.2f}"
        lines.append(f"| `{command}`{extra} | " + " | ".join(cells) +
                     f" | {t['edit_s']:.0f} s ({t['per_edit_s']:.2f} s) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="*", default=None, choices=list(ROWS))
    p.add_argument("--reuse", action="store_true", help="run nothing; rebuild the table from saved results")
    p.add_argument("--out", default=os.path.join(ROOT, "eval_runs"))
    args = p.parse_args(argv)
    if not args.reuse:
        for name in args.rows or list(ROWS):
            run(name, args.out)
    readme = os.path.join(ROOT, "README.md")
    text = open(readme, encoding="utf-8").read()
    previous = text[text.index(START):text.index(END)] if START in text and END in text else ""
    body = table(args.out, previous)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    block = (f"{START}\n`python benchmarks/eval_table.py` (CPU only, {machine}; library defaults, fast editor, "
             f"embedded SmolLM2-135M-Instruct; test splits):\n\n{body}\n{END}")
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        raise SystemExit(f"README.md has no {START} ... {END} section to replace")
    tmp = readme + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, readme)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
