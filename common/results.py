"""Published numbers as data, and the commands that reproduce them.

Each subproject declares its tables in `<paper>/published.py` as a list `TABLES` of `Table`s (and a list `SMOKE` of
`Run`s for `reproduce.sh smoke`). This module collects them in README order.

A row says where its number comes from, what statistic it is, which log.jsonl key holds the accuracy it is about, and
which protocol (best or final epoch) turns a run's log into one number. `value=None` means the number could not be
transcribed from the paper: the row is still reproducible, and the comparison reports it without a verdict.
"""
import importlib
from dataclasses import dataclass, field

PAPERS = ("dcm", "okddip", "ffsd", "mcl")  # README order of the tables


@dataclass(frozen=True)
class Row:
    name: str                      # e.g. "WRN-28-10 | WRN-28-10, DCM"
    value: float | None            # published number (None: not transcribed)
    key: str                       # log.jsonl key with the top-1 accuracy (percent) this row is about
    workdir: str                   # subproject folder the command runs in ("dcm")
    argv: tuple                    # script and its options, e.g. ("main.py", "--depth", "28", "--width", "10")
    match: dict                    # args.json values that identify a run of this row (script included)
    epochs: int                    # length of the published schedule (shorter runs get no verdict)
    metric: str = "top1"           # what `value` is: "top1" accuracy or "error" (100 - top1), in percent
    std: float | None = None       # published spread
    n: int = 1                     # runs behind the published number
    statistic: str = "single run"  # "single run", "mean ± std over n runs", "mean of n runs", ...
    protocol: str = "best"         # "best" (max over epochs) or "final" (last epoch)
    source: str = ""               # paper table, or authors' README
    tolerance: float = 0.5         # verdict band, in points
    scale_args: dict = field(default_factory=dict)  # {"smoke": (...), "short": (...)}: appended to argv
    launcher: str = "python"       # "python" or "torchrun" (ImageNet rows)
    note: str = ""
    bench: tuple = ()              # (method, arch) of the common.bench case that times this row's step (--plan)


@dataclass(frozen=True)
class Table:
    id: str        # "table1" ... as numbered in the README
    title: str
    source: str
    rows: tuple
    seeds: tuple = (1,)  # default seeds for reproduce.sh


@dataclass(frozen=True)
class Run:
    """A smoke run: one script invocation on synthetic data."""
    name: str
    workdir: str
    argv: tuple
    dataset: str = "cifar100"  # which synthetic folder --data-root points at: cifar10, cifar100, imagenet
    launcher: str = "python"
    nproc: int = 1
    rows: tuple = ()  # ((table id, row name), ...): the table rows this run exercises at smoke scale


def paper_modules(name):
    """`<paper>.<name>` for every paper that has such a module (e.g. "published", "bench"), in README order."""
    modules = []
    for paper in PAPERS:
        try:
            modules.append(importlib.import_module(f"{paper}.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"{paper}.{name}":
                raise
    return modules


def all_tables():
    tables = [t for module in paper_modules("published") for t in module.TABLES]
    ids = [t.id for t in tables]
    if len(ids) != len(set(ids)):
        raise RuntimeError(f"duplicate table ids: {ids}")
    return sorted(tables, key=lambda t: int(t.id.removeprefix("table")))


def all_smoke_runs():
    return [run for module in paper_modules("published") for run in getattr(module, "SMOKE", ())]


def find_table(table_id):
    for t in all_tables():
        if t.id == table_id:
            return t
    valid = ", ".join(t.id for t in all_tables())
    raise KeyError(f"unknown table {table_id!r}; valid: {valid}")


def md_cell(text):
    """Text for a markdown table cell: row names such as 'WRN-28-10 | MobileNet' must not split the cell."""
    return str(text).replace("|", "\\|")


def tables_markdown():
    """The README's results tables: published values with their source, statistic, protocol and command."""
    out = []
    for number, table in enumerate(all_tables(), 1):
        out.append(f"### Table {number} (`{table.id}`): {table.title}\n\nSource: {table.source}. "
                   f"Reproduce: `bash reproduce.sh {table.id}`.\n")
        out.append("| row | published | metric | statistic | protocol | command |")
        out.append("|---|---|---|---|---|---|")
        for row in table.rows:
            if row.value is None:
                pub = "not transcribed"
            else:
                pub = f"{row.value:.2f}" + (f" ± {row.std:.2f}" if row.std is not None else "")
            cmd = f"cd {row.workdir} && " + ("torchrun " if row.launcher == "torchrun" else "python ") + \
                " ".join(row.argv)
            note = f" ({row.note})" if row.note else ""
            out.append(f"| {md_cell(row.name + note)} | {pub} | {row.metric} | {md_cell(row.statistic)} | "
                       f"{row.protocol} epoch | `{cmd}` |")
        out.append("")
    return "\n".join(out)


README_BEGIN, README_END = "<!-- results tables: generated by python -m common.results --write-readme -->", \
    "<!-- end of results tables -->"


def write_readme(path):
    """Replace the README's generated block with the current tables."""
    with open(path) as f:
        text = f.read()
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    with open(path, "w") as f:
        f.write(f"{head}{README_BEGIN}\n\n{tables_markdown()}\n{README_END}{tail}")


if __name__ == "__main__":
    import argparse
    import os

    parser = argparse.ArgumentParser(description="print the results tables, or refresh them in README.md")
    parser.add_argument("--write-readme", action="store_true")
    if parser.parse_args().write_readme:
        write_readme(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"))
    else:
        print(tables_markdown())
