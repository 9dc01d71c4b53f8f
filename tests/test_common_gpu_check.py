"""`bash reproduce.sh gpu-check --device cpu --tiny`: the GPU check's whole path on the CPU, in a Python where
tensorboardX, tqdm and matplotlib cannot be imported (the GPU machines lack some of them)."""
import json
import os
import subprocess

from common.options import REPO

MISSING = ("tensorboardX", "tqdm", "matplotlib")


def test_gpu_check_tiny_measures_every_case_both_ways_and_learns(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in MISSING:  # each import of these raises ImportError, in this process and in the training runs
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocked), REPO]), DATA_ROOT=str(tmp_path / "no-data"))
    out = tmp_path / "check"
    proc = subprocess.run(["bash", os.path.join(REPO, "reproduce.sh"), "gpu-check", "--device", "cpu", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["tiny"] and report["torch"]
    measured = {(r["paper"], r["method"], r["arch"]) for r in report["throughput"]}
    assert measured == {("okddip", "baseline", "resnet32"), ("okddip", "okddip", "resnet32"),
                        ("ffsd", "FFSD", "resnet32"), ("mcl", "L-MCL", "resnet32"),
                        ("dcm", "dcm", "wrn-16-2|wrn-16-2")}
    for row in report["throughput"]:
        for mode in ("faithful", "fast"):
            assert row[mode]["train_images_per_s"] > 0 and row[mode]["e2e_images_per_s"] > 0, (row, mode)
            assert row[mode]["batch"] == 4
    mcl = next(r for r in report["throughput"] if r["paper"] == "mcl")
    assert mcl["faithful"]["step_ratios"]["meta"] > 1  # the meta step, as a multiple of an ordinary step
    # no real CIFAR-10 under the data folder: the digits, faithful and --fast, one short epoch each
    assert report["learning_data"].startswith("scikit-learn digits")
    assert set(report["learning"]) == {"faithful", "fast"}
    for result in report["learning"].values():
        assert result["epochs"] == 1 and 0 <= result["test_top1"] <= 100
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("# GPU check: ") and "| mcl | L-MCL | resnet32 | 4 |" in table and "meta " in table


def test_gpu_check_reports_the_cases_a_spent_budget_skipped(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", os.path.join(REPO, "reproduce.sh"), "gpu-check", "--device", "cpu", "--tiny",
                           "--budget", "0", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, DATA_ROOT=str(tmp_path / "no-data")))
    assert proc.returncode == 0, proc.stderr[-3000:]  # skipped is not failed
    report = json.loads((out / "gpu_check.json").read_text())
    assert len(report["throughput"]) == 5
    assert all(r["faithful"] is None and r["faithful_error"].startswith("skipped") for r in report["throughput"])
    assert (out / "gpu_check.md").read_text().count("skipped: the --budget of 0 s was spent") == 5
