#!/usr/bin/python3
"""Plot `strata bench allreduce --json` results: median latency against message size, one line
per algorithm and transport (p99 as a shaded band).

    bench/plot_allreduce.py results.json [more.json ...] -o allreduce.png [--title TEXT]

Needs Debian's python3-matplotlib (scripts/install-deps.sh --bench)."""
import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="JSON files written by strata bench allreduce")
    ap.add_argument("-o", "--output", required=True, help="PNG to write")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()

    series = {}
    delays = set()
    ranks = set()
    docs = []
    for path in args.inputs:
        try:
            with open(path) as f:
                docs.append(json.load(f))
        except (OSError, ValueError) as e:
            sys.exit(f"plot_allreduce: cannot read {path}: {e}")
    all_ranks = {r["ranks"] for d in docs for r in d.get("results", [])}
    for doc in docs:
        for r in doc.get("results", []):
            key = f'{r["algorithm"]} ({r["transport"]}'
            key += f', {r["ranks"]} ranks)' if len(all_ranks) > 1 else ")"
            series.setdefault(key, []).append((r["bytes"], r["latency_us_median"], r["latency_us_p99"]))
            ranks.add(r["ranks"])
            if r["transport"] == "tcp" and r.get("emulated_link_delay_us", 0):
                delays.add(r["emulated_link_delay_us"])
    if not series:
        sys.exit("plot_allreduce: no results in the inputs")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted(series):
        pts = sorted(series[key])
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], marker="o", label=key)
        ax.fill_between(xs, [p[1] for p in pts], [p[2] for p in pts], alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("latency (us), median; band to p99")
    title = args.title or f"allreduce, {'/'.join(map(str, sorted(ranks)))} ranks"
    if delays:
        title += f" (EMULATED link delay {'/'.join(map(str, sorted(delays)))} us)"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
