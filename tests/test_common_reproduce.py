import json
import os
import shlex
import subprocess
import sys

import pytest

from common import reproduce
from common.bench import all_cases
from common.loop import KILL_ENV
from common.results import Row, Table, all_smoke_runs, all_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _sh(*args):
    return subprocess.run(["bash", os.path.join(REPO, "reproduce.sh"), *args], capture_output=True, text=True)


def _argv(line):
    return shlex.split(line.split("&& ", 1)[1].rstrip(")"))


def test_list_prints_every_table_with_its_distinct_runs():
    out = _sh("list")
    assert out.returncode == 0, out.stderr
    for table in all_tables():
        assert table.id in out.stdout and table.title in out.stdout
    assert "distinct runs" in out.stdout


def test_the_stored_forward_flops_cover_every_row_and_recount_the_same():
    """The plan's FLOP counts (common/forward_flops.json) name every bench case a table row names, and two of them,
    counted again by the code that wrote them, agree (a changed network must update the file)."""
    with open(reproduce.FORWARD_FLOPS) as f:
        known = json.load(f)
    named = {"|".join((r.workdir, *r.bench)) for t in all_tables() for r in t.rows}
    assert named <= set(known), sorted(named - set(known))
    cases = {"|".join((c.paper, c.method, c.arch)): c for c in all_cases()}
    for name in ("okddip|okddip|resnet32", "mcl|L-MCL|resnet32"):
        assert reproduce.forward_flops_per_image(cases[name]) == known[name]


def test_unknown_table_lists_valid_ids():
    out = _sh("table999")
    assert out.returncode == 2 and "valid" in out.stderr


@pytest.mark.parametrize("table", [t.id for t in all_tables()])
def test_dry_run_prints_each_distinct_run_once(table, tmp_path, capsys):
    t = next(t for t in all_tables() if t.id == table)
    assert reproduce.main([table, "--seeds", "1 2", "--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    distinct = {(r.workdir, r.launcher, tuple(r.argv), s) for r in t.rows for s in (1, 2)}
    assert len(lines) == len(set(lines)) == len(distinct)
    for line in lines:
        argv = _argv(line)
        seed = argv[argv.index("--seed") + 1]
        run_dir = argv[argv.index("--run-dir") + 1]
        assert run_dir.startswith(str(tmp_path / table / "full")) and run_dir.endswith(f"seed{seed}")
        assert "--resume" in argv
    assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_table1_trains_each_distinct_run_once(tmp_path):
    """The baseline appears in three rows, each DML/DCM pair in a net-1 and a net-2 row."""
    t = next(t for t in all_tables() if t.id == "table1")
    jobs = reproduce.table_jobs(t, "full", [1], str(tmp_path), str(tmp_path), 1, create=False)
    assert len(jobs) < len(t.rows)
    assert sum(len(j.rows) for j in jobs) == len(t.rows)
    assert len({j.run_dir for j in jobs}) == len(jobs)
    assert max(len(j.rows) for j in jobs) == 3


def test_scales_never_share_a_run_folder(tmp_path):
    t = all_tables()[0]
    dirs = {scale: {j.run_dir for j in reproduce.table_jobs(t, scale, [1], str(tmp_path), str(tmp_path), 1,
                                                               create=False)} for scale in ("smoke", "short", "full")}
    assert not (dirs["smoke"] & dirs["full"]) and not (dirs["short"] & dirs["full"])
    smoke = _sh(t.id, "--scale", "smoke", "--out", str(tmp_path), "--dry-run")
    assert smoke.returncode == 0 and "synthetic-data" in smoke.stdout
    runs = _sh("smoke", "--out", str(tmp_path), "--dry-run")
    assert runs.returncode == 0 and len(runs.stdout.strip().splitlines()) == len(all_smoke_runs())


def test_every_row_names_a_bench_case_and_every_smoke_run_real_rows():
    from common.bench import all_cases
    cases = {(c.paper, c.method, c.arch) for c in all_cases()}
    rows = {(t.id, r.name): r for t in all_tables() for r in t.rows}
    assert [name for name, r in rows.items() if (r.workdir, *r.bench) not in cases] == []
    compared = set()
    for run in all_smoke_runs():
        for key in run.rows:  # a smoke run stands only for rows of its own script
            assert key in rows and (rows[key].workdir, rows[key].argv[0]) == (run.workdir, run.argv[0]), run.name
            compared.add(run.workdir)
    assert compared == {t_row.workdir for t_row in rows.values()}  # every paper's smoke is compared


def _tiny_table(seeds_fail=()):
    base = ("tiny_train.py", "--epochs", "2", "--steps-per-epoch", "4", "--eval-batches", "1", "--quiet",
            "--save-every-steps", "2")
    rows = (Row("tiny a", None, "test/net/top1", "tests", base, {}, 2),
            Row("tiny a again", None, "test/net/top1", "tests", base, {}, 2),  # the same run read by two rows
            Row("tiny lr", None, "test/net/top1", "tests", base + ("--lr", "0.02"), {}, 2),
            Row("tiny broken", None, "test/net/top1", "tests", base + ("--lr", "-1"), {}, 2))
    return Table("table0", "tiny", "tests", rows)


def _logs(jobs):
    out = {}
    for job in jobs:
        path = os.path.join(job.run_dir, "log.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                out[job.name] = [{k: v for k, v in json.loads(line).items() if not k.endswith(("_time", "_per_s"))}
                                 for line in f]
    return out


def test_a_pool_of_two_gives_the_sequential_logs_and_survives_a_failed_run(synthetic_root, tmp_path, capsys):
    table = _tiny_table()
    launcher = reproduce.Launcher()
    seq = reproduce.table_jobs(table, "full", [1], str(tmp_path / "seq"), str(synthetic_root), 1)
    par = reproduce.table_jobs(table, "full", [1], str(tmp_path / "par"), str(synthetic_root), 1)
    assert len(seq) == 3
    results = {j.name: state for j, state, _ in reproduce.run_local(seq, launcher, 1)}
    pooled = {j.name: state for j, state, _ in reproduce.run_local(par, launcher, 2, gpus=None)}
    assert results == pooled == {"tiny a": "done", "tiny lr": "done", "tiny broken": "failed (exit 2)"}
    assert _logs(seq) == _logs(par) and set(_logs(par)) == {"tiny a", "tiny lr"}
    assert "--lr must be positive" in open(os.path.join(par[2].run_dir, reproduce.OUTPUT_LOG)).read()
    with open(os.path.join(par[0].run_dir, reproduce.ROWS_FILE)) as f:
        assert [r["row"] for r in json.load(f)] == ["tiny a", "tiny a again"]
    again = {j.name: state for j, state, _ in reproduce.run_local(par, launcher, 2)}
    assert again["tiny a"] == "finished already"
    failed = reproduce.summary([(j, s, 0.0) for j, s in zip(par, again.values())], 1.0)
    assert len(failed) == 1 and "2 passed, 1 failed" in capsys.readouterr().out


def test_submitit_local_array_runs_and_a_killed_task_resumes(synthetic_root, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    table = _tiny_table()
    jobs = reproduce.table_jobs(table, "full", [1], str(tmp_path / "array"), str(synthetic_root), 1)[:1]
    straight = reproduce.table_jobs(table, "full", [1], str(tmp_path / "straight"), str(synthetic_root), 1)[:1]
    reproduce.run_local(straight, reproduce.Launcher(), 1)
    args = reproduce.get_args_parser().parse_args(["table0", "--slurm", "--time", "00:10"])
    monkeypatch.setenv(KILL_ENV, "5")  # every task dies after its 5th step (inside epoch 2)
    first = reproduce.run_slurm(jobs, args, str(tmp_path / "array"))
    assert all(state.startswith("failed") for _, state, _ in first)
    monkeypatch.delenv(KILL_ENV)
    second = reproduce.run_slurm(jobs, args, str(tmp_path / "array"))  # resubmitted: resumes from step 4
    assert [state for _, state, _ in second] == ["done"]
    log = open(os.path.join(jobs[0].run_dir, reproduce.OUTPUT_LOG)).read()
    assert "after 1 epoch(s)" in log
    assert _logs(jobs) == _logs(straight)


def test_ddp_helpers_under_torchrun(tmp_path):
    out = subprocess.run(TORCHRUN + [os.path.join(REPO, "tests", "ddp_check.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DDP OK" in out.stdout
    with open(tmp_path / "log.jsonl") as f:
        assert [line for line in f] == ['{"epoch": 1, "rank": 0}\n']  # rank 1 wrote nothing


def test_the_epoch_driver_under_torchrun(synthetic_root, tmp_path):
    """Two processes: one log written by rank 0, metrics summed over both, the NaN stop reached by both at once."""
    tiny = [os.path.join(REPO, "tests", "tiny_train.py"), "--data-root", str(synthetic_root), "--quiet",
            "--epochs", "1", "--steps-per-epoch", "4", "--eval-batches", "2", "--device", "cpu"]
    out = subprocess.run(TORCHRUN + tiny + ["--run-dir", str(tmp_path / "ok")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "ok" / "log.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    assert record["epoch"] == 1 and 0 <= record["test/net/top1"] <= 100
    with open(tmp_path / "ok" / "args.json") as f:
        assert json.load(f)["identity"]["world_size"] == 2
    nan = subprocess.run(TORCHRUN + tiny + ["--run-dir", str(tmp_path / "nan"), "--nan-at-step", "3",
                                            "--print-freq", "1"], capture_output=True, text=True, timeout=300)
    assert nan.returncode != 0 and "NaN or inf at epoch 1, step 3" in nan.stderr


@pytest.mark.slow
def test_smoke_reproduction_runs_every_method_and_compares(tmp_path):
    """`bash reproduce.sh smoke`: every smoke run finishes, a second call skips them all, the comparison is written."""
    out = _sh("smoke", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    runs = all_smoke_runs()
    assert f"{len(runs)} passed, 0 failed" in out.stdout and "match no table row" not in out.stdout
    assert (tmp_path / "smoke" / "comparison.md").exists()
    again = _sh("smoke", "--out", str(tmp_path))
    assert again.returncode == 0 and again.stdout.count("finished already in") == len(runs)
