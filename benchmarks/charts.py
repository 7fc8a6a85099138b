"""Draw the docs' performance charts (SVG) from the benchmarks' own JSON output.

    .venv/bin/python benchmarks/bench_native.py -n 40 --json docs/data/bench_native.json
    .venv/bin/python benchmarks/bench_cost.py --json docs/data/bench_cost.json
    .venv/bin/python benchmarks/charts.py          # docs/data/*.json -> docs/img/*.svg

Each chart says in its caption what it was measured on (machine, date, load average), read
from the JSON that the benchmark wrote (benchmarks/results.py). A chart whose data file is
missing is left as it is, with one line saying so. matplotlib comes with the docs extra
(pip install -e '.[docs]').
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "docs", "data")
IMG = os.path.join(REPO, "docs", "img")
FLOOR = "python -S -E -c pass (the floor)"


def caption(record: dict) -> str:
    """Machine, date and load of a benchmark run, for a chart's foot."""
    m, load = record["machine"], record["load"]
    return (f"{record['command']}  ·  {record['date'][:16].replace('T', ' ')}  ·  {m['cpu']}, "
            f"{m['cpus']} CPUs, {m['memory_gib']:g} GiB, Python {m['python']}  ·  load average "
            f"{load['before'][0]:.1f} before, {load['after'][0]:.1f} after")  # fmt: skip


def figure(plt, title: str, record: dict, height: float = 3.0):
    fig, ax = plt.subplots(figsize=(9, height))
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    fig.text(0.01, 0.01, caption(record), fontsize=6.5, color="#555555")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def bars(ax, labels: list, values: list, unit: str, colors: list) -> None:
    """Horizontal bars, first label on top, each with its value written beside it."""
    y = range(len(labels))[::-1]
    ax.barh(list(y), values, color=colors, height=0.6)
    ax.set_yticks(list(y), labels, fontsize=9)
    for yi, v in zip(y, values):
        text = f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
        ax.text(v * 1.04 if ax.get_xscale() == "log" else v, yi, f"  {text} {unit}",
                va="center", fontsize=8.5)  # fmt: skip


def startup_chart(plt, record: dict) -> object:
    """Cold against warm: one script importing torch and transformers, and the floor."""
    s = record["figures"]["startup"]
    labels = ["python script.py (cold)", "./starter script.py, Python starter (warm)",
              "./starter script.py, native starter (warm)", FLOOR]  # fmt: skip
    values = [s["cold"] * 1e3, s["python"] * 1e3, s["native"] * 1e3, s["noop"] * 1e3]
    fig, ax = figure(plt, "A torch + transformers script: cold against warm (median ms, log "
                          "scale)", record)  # fmt: skip
    ax.set_xscale("log")
    bars(ax, labels, values, "ms", ["#b0b0b0", "#6a9fd4", "#1f5fa8", "#e0a040"])
    ax.set_xlim(1, max(values) * 8)
    fig.subplots_adjust(left=0.36, right=0.97, top=0.85, bottom=0.2)
    return fig


def _server_labels(mb: int) -> dict:
    return {"floor": FLOOR,
            "small": "warm -c pass, torch + transformers server",
            "big": f"warm -c pass, the same server holding +{mb} MB",
            "small, no standby": "warm -c pass, torch + transformers, no standby child",
            "big, 4 KiB pages": f"warm -c pass, +{mb} MB, no huge pages"}  # fmt: skip


def cost_chart(plt, record: dict) -> object:
    """CPU the machine pays per run, against the floor (and without the settings that help)."""
    f = record["figures"]
    labels = _server_labels(f.get("mb", 700))
    names = [n for n in labels if n in f["batches"]]
    values = [f["batches"][n]["cpu"] * 1e3 for n in names]
    fig, ax = figure(plt, "CPU per run, runs back to back (median ms: the client, the server, "
                          "the child and its teardown)", record, height=1.2 + 0.5 * len(names))  # fmt: skip
    colors = ["#e0a040" if n == "floor" else "#b0b0b0" if "," in n else "#1f5fa8" for n in names]
    bars(ax, [labels[n] for n in names], values, "ms", colors)
    ax.axvline(values[0], color="#e0a040", linestyle="--", linewidth=1)
    ax.set_xlim(0, max(values) * 1.3)
    fig.subplots_adjust(left=0.4, right=0.97, top=1 - 0.5 / fig.get_figheight(),
                        bottom=0.6 / fig.get_figheight())  # fmt: skip
    return fig


def growth_chart(plt, record: dict) -> object:
    """How the cost of a run grows with what the server holds."""
    f = record["figures"]
    rss = lambda name: f["memory"][name].get("VmRSS", 0) / 2**20  # noqa: E731
    fig, ax = figure(plt, "CPU and wall time per run as the server grows (median ms)", record,
                     height=3.6)  # fmt: skip
    xs = [rss("small"), rss("big")]
    for key, label, color in (("cpu", "CPU per run", "#1f5fa8"),
                              ("wall", "wall per run", "#6a9fd4")):  # fmt: skip
        values = [f["batches"][k][key] * 1e3 for k in ("small", "big")]
        ax.plot(xs, values, marker="o", color=color, label=label)
        for x, v in zip(xs, values):
            ax.annotate(f"{v:.1f}", (x, v), textcoords="offset points", xytext=(6, 4),
                        fontsize=8)  # fmt: skip
    if "big, 4 KiB pages" in f["batches"]:
        v = f["batches"]["big, 4 KiB pages"]["cpu"] * 1e3
        x = rss("big, 4 KiB pages")
        ax.plot([x], [v], marker="x", color="#808080", linestyle="none",
                label="CPU per run, big server without huge pages")  # fmt: skip
        ax.annotate(f"{v:.1f}", (x, v), textcoords="offset points", xytext=(6, 4), fontsize=8)
    floor = f["batches"]["floor"]["cpu"] * 1e3
    ax.axhline(floor, color="#e0a040", linestyle="--", linewidth=1,
               label=f"CPU of python -S -E -c pass ({floor:.1f})")  # fmt: skip
    ax.set_xlabel("server RSS (MiB)", fontsize=9)
    ax.set_ylim(0, None)
    ax.set_xlim(0, max(xs) * 1.2)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.subplots_adjust(left=0.07, right=0.62, top=0.88, bottom=0.25)
    return fig


CHARTS = {
    "startup.svg": ("bench_native.json", startup_chart),
    "cost.svg": ("bench_cost.json", cost_chart),
    "growth.svg": ("bench_cost.json", growth_chart),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA, help="where the benchmarks' JSON files are")
    parser.add_argument("--out", default=IMG, help="where to write the SVG files")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    # Reproducible files: no date or random ids in the SVG, so a re-run without new data
    # changes nothing.
    plt.rcParams.update({"svg.hashsalt": "py-preload", "svg.fonttype": "none"})
    os.makedirs(args.out, exist_ok=True)
    for name, (source, draw) in CHARTS.items():
        path = os.path.join(args.data, source)
        if not os.path.exists(path):
            print(f"charts: {name}: no {path}; run the benchmark with --json first", file=sys.stderr)
            continue
        with open(path, encoding="utf-8") as f:
            fig = draw(plt, json.load(f))
        fig.savefig(os.path.join(args.out, name), metadata={"Date": None})
        plt.close(fig)
        print(f"charts: wrote {os.path.join(os.path.relpath(args.out, REPO), name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
