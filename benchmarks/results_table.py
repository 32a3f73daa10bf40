"""Turn pytest-benchmark JSON into the "## Editing", "## Inference" and "## Kernels (CPU)" sections of benchmarks/RESULTS.md.

    pytest benchmarks/bench_editing.py benchmarks/bench_inference.py --benchmark-only --benchmark-json=bench.json
    python benchmarks/results_table.py bench.json --command "the pytest command above"

Each section gets one table per benchmark group: median, ratio to the group's baseline provider
("reference" for editing, "base" for inference; else the first row), rounds, and the figures the
benchmark stored in ``extra_info`` (metrics, peak memory); then the machine, the date, the commit and
the command. Only those two sections are replaced (or appended); every other section of the file, e.g.
"## Kernels" or the memory budget, is kept byte for byte.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
SECTIONS = {  # benchmark file -> (heading, baseline provider, extra_info columns)
    "bench_editing.py": ("## Editing", "reference",
                         ("reliability", "generality", "locality", "peak_rss_delta_mib", "steps", "final_loss",
                          "reference_s", "fast_s", "speedup")),
    "bench_inference.py": ("## Inference", "base", ("prompt_tokens", "prefill_in_scope_ratio", "prefill_unrelated_ratio",
                                                    "generate_in_scope_ratio", "generate_unrelated_ratio")),
    "bench_kernels.py": ("## Kernels (CPU)", "floor", ("ratio",)),
}
HEADERS = {"peak_rss_delta_mib": "peak RSS +MiB", "final_loss": "final loss", "prompt_tokens": "prompt tokens",
           "reference_s": "reference runs (s)", "fast_s": "fast runs (s)", "speedup": "fast vs reference",
           "ratio": "torch / floor (medians)"}


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def _section_of(bench: dict) -> str | None:
    path = bench.get("fullname", "").split("::")[0]
    return os.path.basename(path) if os.path.basename(path) in SECTIONS else None


def machine_line(data: dict) -> str:
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {})
    brand = cpu.get("brand_raw") or m.get("processor") or "unknown CPU"
    cores = cpu.get("count")
    return (f"{brand}" + (f", {cores} logical cores" if cores else "") + f", {m.get('system', '')} {m.get('release', '')}, "
            f"Python {m.get('python_version', '?')}")


def section_text(heading: str, baseline: str, extras: tuple, benches: list[dict], data: dict, command: str,
                 note: str | None) -> str:
    groups: dict[str, list[dict]] = {}
    for b in benches:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    lines = [heading, ""]
    for group, rows in groups.items():
        provider = lambda b: b.get("extra_info", {}).get("provider") or b.get("param") or b["name"]  # noqa: E731
        base = next((b for b in rows if provider(b) == baseline), rows[0])
        base_median = base["stats"]["median"]
        cols = [c for c in extras if any(c in b.get("extra_info", {}) for b in rows)]
        lines.append(f"### {group}")
        lines.append("")
        header = ["provider", "median", "ratio to " + provider(base), "rounds"] + [HEADERS.get(c, c) for c in cols]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|---|---:|---:|---:|" + "---:|" * len(cols))
        for b in rows:
            med = b["stats"]["median"]
            extra = b.get("extra_info", {})
            cells = [provider(b), _fmt_time(med), f"{med / base_median:.3f}x", str(b["stats"]["rounds"])]
            cells += [_fmt(extra.get(c)) for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
        loads = sorted({str(b.get("extra_info", {}).get("loadavg_1min")) for b in rows if "loadavg_1min" in b.get("extra_info", {})})
        threads = sorted({str(b.get("extra_info", {}).get("threads")) for b in rows if "threads" in b.get("extra_info", {})})
        if threads or loads:
            lines.append("")
            lines.append(f"torch threads: {', '.join(threads) or '?'}; 1-minute load average when run: {'; '.join(loads) or '?'}")
        lines.append("")
    commit = data.get("commit_info", {})
    cid = str(commit.get("id", "?"))
    cid = cid[:10] if re.fullmatch(r"[0-9a-f]{40}", cid) else cid  # "unversioned" outside a git checkout
    lines.append(f"Machine: {machine_line(data)}. Date: {data.get('datetime', '?')}. "
                 f"Commit: {cid}{' (dirty)' if commit.get('dirty') else ''}.")
    lines.append("")
    lines.append(f"Command: `{command}`")
    if note:
        lines.append("")
        lines.append(note)
    lines.append("")
    return "\n".join(lines)


def replace_sections(text: str, new: dict[str, str]) -> str:
    """Replace each ``## Heading`` section of ``text`` named in ``new`` (up to the next ``## ``), or append it."""
    parts = re.split(r"(?m)^(?=## )", text)
    out, done = [], set()
    for part in parts:
        heading = part.split("\n", 1)[0].rstrip()
        if heading in new:
            out.append(new[heading].rstrip("\n") + "\n\n")
            done.add(heading)
        else:
            out.append(part)
    body = "".join(out)
    for heading, sec in new.items():
        if heading not in done:
            body = body.rstrip("\n") + "\n\n" + sec.rstrip("\n") + "\n"
    return body.rstrip("\n") + "\n"


def build(data: dict, command: str, notes: dict[str, str] | None = None) -> dict[str, str]:
    by_file: dict[str, list[dict]] = {}
    for b in data.get("benchmarks", []):
        f = _section_of(b)
        if f:
            by_file.setdefault(f, []).append(b)
    out = {}
    for f, benches in by_file.items():
        heading, baseline, extras = SECTIONS[f]
        out[heading] = section_text(heading, baseline, extras, benches, data, command, (notes or {}).get(heading))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="pytest-benchmark JSON (--benchmark-json=...)")
    p.add_argument("--results", default=RESULTS, help="markdown file to update (default benchmarks/RESULTS.md)")
    p.add_argument("--command", default="pytest benchmarks/ --benchmark-only --benchmark-json=bench.json",
                   help="the command that produced the JSON, quoted in the file")
    p.add_argument("--note-editing", default=None, help="a paragraph under the Editing tables")
    p.add_argument("--note-inference", default=None, help="a paragraph under the Inference tables")
    p.add_argument("--note-kernels", default=None, help="a paragraph under the Kernels (CPU) tables")
    p.add_argument("--print", action="store_true", help="print the sections instead of writing the file")
    args = p.parse_args(argv)
    with open(args.json, encoding="utf-8") as f:
        data = json.load(f)
    notes = {"## Editing": args.note_editing, "## Inference": args.note_inference,
             "## Kernels (CPU)": args.note_kernels}
    sections = build(data, args.command, notes)
    if not sections:
        print(f"{args.json}: no benchmarks from {', '.join(SECTIONS)}", file=sys.stderr)
        return 1
    if args.print:
        print("\n".join(sections.values()))
        return 0
    text = ""
    if os.path.exists(args.results):
        with open(args.results, encoding="utf-8") as f:
            text = f.read()
    if not text.strip():
        text = "# Benchmark results\n"
    new_text = replace_sections(text, sections)
    tmp = args.results + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new_text)
    os.replace(tmp, args.results)
    print(f"updated {', '.join(sections)} in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
