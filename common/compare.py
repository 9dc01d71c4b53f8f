"""Compare training logs with the published numbers.

    python -m common.compare RUN_DIR [RUN_DIR ...] [--table table3] [--markdown FILE] [--plot FILE]

Each RUN_DIR is a run directory (args.json + log.jsonl) or any folder above run directories. Every run is matched to
the table rows whose `match` values its args.json has; runs of a row are reduced with the paper's protocol (best or
final epoch of the row's log key), converted to the paper's metric (top-1 or error), and summarised as mean ± std over
runs (seeds). The verdict is 'inside' when |reproduced mean - published| <= the row's tolerance, 'outside' otherwise;
runs shorter than the published schedule get 'incomplete' and rows without a transcribed number get no verdict.
"""
import argparse
import json
import math
import os
import statistics

from common.logging import read_log
from common.results import all_tables, md_cell


def find_runs(paths):
    """Run directories (folders with args.json and log.jsonl) under the given paths."""
    runs = []
    for path in paths:
        for folder, _, files in os.walk(path):
            if "args.json" in files and "log.jsonl" in files:
                runs.append(folder)
    return sorted(set(runs))


def load_run(run_dir):
    with open(os.path.join(run_dir, "args.json")) as f:
        args = json.load(f)
    rows = None
    if os.path.exists(os.path.join(run_dir, "rows.json")):  # written by reproduce.sh: the rows this run stands for
        with open(os.path.join(run_dir, "rows.json")) as f:
            rows = [(r["table"], r["row"]) for r in json.load(f)]
    identity = args.get("identity", {})
    return {"dir": run_dir, "args": args, "log": read_log(run_dir), "rows": rows,
            "data": identity.get("data", "real"), "identity": identity}


def matches(row, args):
    return all(json.loads(json.dumps(v)) == args.get(k) for k, v in row.match.items())


def belongs(table, row, run):
    """A run stands for a row when reproduce.sh said so (rows.json), else when its args.json has the row's values."""
    if run["rows"] is not None:
        return (table.id, row.name) in run["rows"]
    return matches(row, run["args"])


SEED_OPTIONS = ("seed", "manual_seed")


def settings_groups(runs):
    """Runs of one row grouped by their identity without the seed: more than one group means mixed settings."""
    groups = {}
    for run in runs:
        options = {k: v for k, v in run["identity"].get("options", {}).items() if k not in SEED_OPTIONS}
        key = json.dumps([run["identity"].get("script"), options, run["data"]], sort_keys=True)
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def first_difference(a, b):
    oa, ob = a["identity"].get("options", {}), b["identity"].get("options", {})
    for k in sorted(set(oa) | set(ob)):
        if k not in SEED_OPTIONS and oa.get(k) != ob.get(k):
            return f"--{k} {oa.get(k)!r} in {a['dir']} vs {ob.get(k)!r} in {b['dir']}"
    return f"data {a['data']} vs {b['data']}"


def run_value(row, run):
    """(value in the row's metric, epochs run, curve of top-1 per epoch) of one run, or None if the key is absent."""
    curve = [(r["epoch"], r[row.key]) for r in run["log"] if isinstance(r.get(row.key), (int, float))]
    if not curve:
        return None
    top1 = max(v for _, v in curve) if row.protocol == "best" else curve[-1][1]
    value = 100.0 - top1 if row.metric == "error" else top1
    return value, max(e for e, _ in curve), curve


def summarise(row, runs):
    """One comparison line for a row given its runs."""
    values, epochs, curves, seeds = [], [], [], []
    for run in runs:
        got = run_value(row, run)
        if got is None:
            continue
        values.append(got[0])
        epochs.append(got[1])
        curves.append((run["dir"], got[2]))
        seeds.append(run["args"].get("seed", run["args"].get("manual_seed")))
    groups = settings_groups(runs)
    if len(groups) > 1:  # never average runs made with other settings
        return {"row": row.name, "published": row.value, "published_std": row.std, "published_n": row.n,
                "metric": row.metric, "protocol": row.protocol, "tolerance": row.tolerance, "n": len(runs),
                "seeds": [], "curves": [], "mean": None, "std": None, "diff": None,
                "verdict": f"mixed settings, not averaged: {first_difference(groups[0][0], groups[1][0])}"}
    line = {"row": row.name, "published": row.value, "published_std": row.std, "published_n": row.n,
            "metric": row.metric, "protocol": row.protocol, "tolerance": row.tolerance, "n": len(values),
            "seeds": seeds, "curves": curves, "mean": None, "std": None, "diff": None}
    if not values:
        line["verdict"] = "no runs"
        return line
    line["mean"] = statistics.fmean(values)
    line["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    if row.value is not None:
        line["diff"] = line["mean"] - row.value
    if min(epochs) < row.epochs:
        line["verdict"] = f"incomplete ({min(epochs)}/{row.epochs} epochs)"
    elif row.value is None:
        line["verdict"] = "no published value"
    else:
        line["verdict"] = "inside" if abs(line["diff"]) <= row.tolerance else "outside"
    return line


def compare(run_dirs, tables, include_synthetic=False):
    """Comparison lines per table for the runs found under run_dirs. Runs on synthetic or digits data are left out
    unless INCLUDE_SYNTHETIC (smoke runs), so they never enter a mean beside real runs."""
    runs = [load_run(d) for d in find_runs(run_dirs)]
    runs = [r for r in runs if include_synthetic or r["data"] == "real"]
    report = []
    for table in tables:
        lines = []
        for row in table.rows:
            row_runs = [r for r in runs if belongs(table, row, r)]
            if row_runs:
                lines.append(summarise(row, row_runs))
        if lines:
            report.append((table, lines))
    return report, runs


def _fmt(v, std=None, n=None):
    if v is None:
        return "-"
    s = f"{v:.2f}"
    if std is not None:
        s += f" ± {std:.2f}"
    if n is not None and n > 1:
        s += f" (n={n})"
    return s


def to_markdown(report):
    out = []
    for table, lines in report:
        out.append(f"### {table.id}: {table.title}\n\nSource: {table.source}\n")
        out.append("| row | metric (protocol) | published | reproduced | diff | verdict |")
        out.append("|---|---|---|---|---|---|")
        for ln in lines:
            pub = "not transcribed" if ln["published"] is None else _fmt(ln["published"], ln["published_std"],
                                                                          ln["published_n"])
            rep = _fmt(ln["mean"], ln["std"] if ln["n"] > 1 else None, ln["n"])
            diff = "-" if ln["diff"] is None else f"{ln['diff']:+.2f}"
            out.append(f"| {md_cell(ln['row'])} | {ln['metric']} ({ln['protocol']} epoch) | {pub} | {rep} | {diff} | "
                       f"{ln['verdict']} |")
        out.append("")
    return "\n".join(out)


def plot(report, path):
    """Test top-1 against epoch per row, with the published value (as top-1) drawn as a line. Needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines = [(t, ln) for t, lns in report for ln in lns if ln["curves"]]
    if not lines:
        return None
    cols = min(3, len(lines))
    rows = math.ceil(len(lines) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, (table, ln) in zip(axes.flat, lines):
        for run_dir, curve in ln["curves"]:
            ax.plot([e for e, _ in curve], [v for _, v in curve], lw=1, label=os.path.basename(run_dir))
        if ln["published"] is not None:
            top1 = 100.0 - ln["published"] if ln["metric"] == "error" else ln["published"]
            ax.axhline(top1, color="k", ls="--", lw=1, label="published")
        ax.set_title(f"{table.id}: {ln['row']}", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(lines):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run directories, or folders that contain them")
    parser.add_argument("--table", action="append", help="only these table ids (repeatable)")
    parser.add_argument("--markdown", help="write the table here (default: comparison.md in the first folder)")
    parser.add_argument("--plot", help="write the curves here (default: comparison.png next to the markdown)")
    parser.add_argument("--include-synthetic", action="store_true",
                        help="also compare runs on synthetic or digits data (smoke runs; their numbers mean nothing)")
    args = parser.parse_args(argv)

    tables = [t for t in all_tables() if not args.table or t.id in args.table]
    report, runs = compare(args.run_dirs, tables, args.include_synthetic)
    skipped = len(find_runs(args.run_dirs)) - len(runs)
    if skipped:
        print(f"{skipped} run(s) on synthetic or digits data left out (--include-synthetic to compare them)")
    if not runs:
        print(f"no run directories (args.json + log.jsonl) under {', '.join(args.run_dirs)}")
        return 1
    text = to_markdown(report)
    # rows.json == []: a smoke run of a method that no table reports (run, not compared)
    unmatched = [r["dir"] for r in runs if r["rows"] != [] and
                 not any(belongs(t, row, r) for t in tables for row in t.rows)]
    print(text if report else "no run matches a table row")
    if unmatched:
        print(f"{len(unmatched)} run(s) match no table row: " + ", ".join(unmatched[:5]))
    md = args.markdown or os.path.join(args.run_dirs[0], "comparison.md")
    os.makedirs(os.path.dirname(os.path.abspath(md)), exist_ok=True)
    with open(md, "w") as f:
        f.write(text + "\n")
    png = plot(report, args.plot or os.path.splitext(md)[0] + ".png")
    print(f"written: {md}" + (f", {png}" if png else " (install matplotlib for the plot)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
