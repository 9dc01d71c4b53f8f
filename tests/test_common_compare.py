import json
import os
import subprocess
import sys

import pytest

from common.compare import compare, to_markdown
from common.results import Row, Table, all_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(name, value, protocol, metric="top1", epochs=3, tolerance=0.5, **match):
    return Row(name=name, value=value, key="test/net/top1", workdir="x", argv=("x.py",),
               match={"script": "x.py", **match}, epochs=epochs, metric=metric, protocol=protocol,
               tolerance=tolerance)


def _run(root, name, seed, curve, **args):
    d = root / name
    d.mkdir(parents=True)
    (d / "args.json").write_text(json.dumps({"script": "x.py", "seed": seed, **args}))
    (d / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "test/net/top1": v}) + "\n"
                                         for e, v in enumerate(curve, 1)))


def test_protocols_metrics_and_verdicts(tmp_path):
    # Two seeds of arch a: best 72/74 -> mean 73; final 70/72 -> mean 71.
    _run(tmp_path, "a1", 1, [60, 72, 70], arch="a")
    _run(tmp_path, "a2", 2, [61, 74, 72], arch="a")
    _run(tmp_path, "b1", 1, [50, 55], arch="b")  # 2 of 3 epochs
    _run(tmp_path, "c1", 1, [10, 20, 30], arch="c")  # matches no row
    rows = (
        _row("a best top1", 73.2, "best", arch="a"),
        _row("a final top1", 72.0, "final", arch="a"),
        _row("a final error", 29.0, "final", metric="error", arch="a"),
        _row("a not transcribed", None, "best", arch="a"),
        _row("b", 55.0, "best", arch="b"),
        _row("d", 50.0, "best", arch="d"),
    )
    report, runs = compare([str(tmp_path)], [Table("table99", "test", "fabricated", rows)])
    assert len(runs) == 4
    (table, lines), = report
    by = {ln["row"]: ln for ln in lines}
    assert set(by) == {"a best top1", "a final top1", "a final error", "a not transcribed", "b"}
    assert by["a best top1"]["mean"] == pytest.approx(73.0) and by["a best top1"]["n"] == 2
    assert by["a best top1"]["std"] == pytest.approx(2 ** 0.5)
    assert by["a best top1"]["verdict"] == "inside" and by["a best top1"]["diff"] == pytest.approx(-0.2)
    assert by["a final top1"]["mean"] == pytest.approx(71.0) and by["a final top1"]["verdict"] == "outside"
    assert by["a final error"]["mean"] == pytest.approx(29.0) and by["a final error"]["verdict"] == "inside"
    assert by["a not transcribed"]["verdict"] == "no published value"
    assert by["b"]["verdict"].startswith("incomplete (2/3")
    md = to_markdown(report)
    assert "| a final top1 | top1 (final epoch) | 72.00 | 71.00 ± 1.41 (n=2) | -1.00 | outside |" in md
    assert "not transcribed" in md


def test_compare_cli_writes_markdown(tmp_path):
    _run(tmp_path, "r", 1, [1, 2])
    out = subprocess.run([sys.executable, "-m", "common.compare", str(tmp_path), "--markdown",
                          str(tmp_path / "cmp.md")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "cmp.md").exists() and "match no table row" in out.stdout


def test_published_rows_are_well_formed():
    for table in all_tables():
        assert table.rows and table.source
        for row in table.rows:
            assert row.protocol in ("best", "final") and row.metric in ("top1", "error"), row.name
            assert row.match.get("script"), row.name
            assert row.key.startswith("test/") or row.key.startswith("val/"), row.name
            assert row.value is None or 0 < row.value < 100, row.name
            assert row.value is not None or row.note, f"{row.name}: missing value needs a note"
            assert os.path.isfile(os.path.join(REPO, row.workdir, row.argv[0])), row.argv


def test_readme_tables_are_the_published_data():
    """README.md's results tables are generated from <paper>/published.py and must not drift from it."""
    from common.results import README_BEGIN, README_END, tables_markdown
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    block = text.split(README_BEGIN)[1].split(README_END)[0]
    assert block.strip() == tables_markdown().strip(), "run: python -m common.results --write-readme"
