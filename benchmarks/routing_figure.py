"""Draw the routing analysis of one or more ``memoe-fast edit`` runs as a PNG.

    python benchmarks/routing_figure.py eval_runs/zsre-30/results.json [more results.json] --out routing.png

Left: the fraction of edit prompts, paraphrases, locality prompts and same-subject prompts that reach
the experts. Right: the expert load (edit prompts per expert). Needs matplotlib (the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="results.json files written by `memoe-fast edit`")
    p.add_argument("--out", default="routing.png")
    args = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("routing_figure: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    runs = []
    for path in args.results:
        r = json.load(open(path))
        if "routing" not in r:
            print(f"routing_figure: {path} has no routing analysis (run without --no-user-metrics)", file=sys.stderr)
            return 2
        runs.append((os.path.basename(os.path.dirname(os.path.abspath(path))), r["routing"]))
    cats = ("edit", "paraphrase", "locality", "same_subject")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(runs)
    for j, (name, rt) in enumerate(runs):
        xs = [i + j * width for i in range(len(cats))]
        left.bar(xs, [rt["reach"][c] or 0.0 for c in cats], width, label=f"{name} (para→same expert "
                 f"{rt['paraphrase_same_expert'] or 0:.2f})")
        load = rt["expert_load"]
        right.bar([i + j * width for i in range(len(load))], load, width, label=name)
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], [c.replace("_", "-") for c in cats])
    left.set_ylabel("fraction reaching the experts")
    left.set_ylim(0, 1.05)
    left.legend(fontsize=7)
    n_exp = max(len(rt["expert_load"]) for _, rt in runs)
    right.set_xticks([i + 0.4 - width / 2 for i in range(n_exp)], [str(i) for i in range(n_exp)])
    right.set_xlabel("expert")
    right.set_ylabel("edit prompts routed there")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
