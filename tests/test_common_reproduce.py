import os
import shlex
import subprocess
import sys

import pytest

from common.results import all_smoke_runs, all_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _sh(*args):
    return subprocess.run(["bash", os.path.join(REPO, "reproduce.sh"), *args], capture_output=True, text=True)


def test_list_prints_every_table():
    out = _sh("list")
    assert out.returncode == 0, out.stderr
    for table in all_tables():
        assert table.id in out.stdout and table.title in out.stdout


def test_unknown_table_lists_valid_ids():
    out = _sh("table999")
    assert out.returncode == 2 and "valid" in out.stderr


@pytest.mark.parametrize("table", [t.id for t in all_tables()] or ["none"])
def test_dry_run_prints_one_command_per_row_and_seed(table, tmp_path):
    if table == "none":
        pytest.skip("no subproject declares tables yet")
    t = next(t for t in all_tables() if t.id == table)
    out = _sh(table, "--seeds", "1 2", "--out", str(tmp_path), "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 * len(t.rows)
    for line, (row, seed) in zip(lines, [(r, s) for r in t.rows for s in (1, 2)]):
        argv = shlex.split(line.split("&& ", 1)[1].rstrip(")"))
        assert argv[argv.index("--seed") + 1] == str(seed)
        assert argv[argv.index("--run-dir") + 1].endswith(f"seed{seed}") and "--resume" in argv
        assert row.argv[0] in argv
    assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_smoke_scale_dry_run_uses_synthetic_data(tmp_path):
    tables = all_tables()
    if not tables:
        pytest.skip("no subproject declares tables yet")
    out = _sh(tables[0].id, "--scale", "smoke", "--out", str(tmp_path), "--dry-run")
    assert out.returncode == 0 and "synthetic-data" in out.stdout
    smoke = _sh("smoke", "--out", str(tmp_path), "--dry-run")
    assert smoke.returncode == 0 and len(smoke.stdout.strip().splitlines()) == len(all_smoke_runs())


def test_ddp_helpers_under_torchrun(tmp_path):
    out = subprocess.run(TORCHRUN + [os.path.join(REPO, "tests", "ddp_check.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DDP OK" in out.stdout
    with open(tmp_path / "log.jsonl") as f:
        assert [line for line in f] == ['{"epoch": 1, "rank": 0}\n']  # rank 1 wrote nothing


@pytest.mark.slow
def test_smoke_reproduction_runs_every_method_and_compares(tmp_path):
    """`bash reproduce.sh smoke`: every smoke run finishes, a second call skips them all, the comparison is written."""
    out = _sh("smoke", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    runs = all_smoke_runs()
    assert out.stdout.count("exit 0 after") == len(runs)
    assert (tmp_path / "smoke" / "comparison.md").exists()
    again = _sh("smoke", "--out", str(tmp_path))
    assert again.returncode == 0 and again.stdout.count("finished already") == len(runs)
