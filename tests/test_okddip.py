"""OKDDip: parity with the released code's fixtures, architecture fingerprints, losses, schedule, smoke runs of every
script and method, KD from a train.py teacher, resume, bad flags."""
import json
import math
import os

import pytest
import torch

from conftest import SHARED_FIXTURES, paper_fixtures
from common.logging import read_log
from okddip import parity
from okddip.engine import lr_at
from okddip.losses import kl_t, okddip_loss, ramp_weight
from okddip.models import IndependentNets, OKDDipBranches, ONEBranches, plain_network

FIXTURE_DIR, FIXTURES = paper_fixtures("okddip")
needs_fixtures = pytest.mark.skipif(not FIXTURES, reason=f"shared OKDDip fixtures not found in {FIXTURE_DIR}")
TINY = ["--num_epochs", "1", "--steps-per-epoch", "2", "--eval-batches", "1", "--batch_size", "8",
        "--num_workers", "0", "--lr", "0.02", "--seed", "1", "--quiet"]


@needs_fixtures
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_parity_fixture(path):
    rep = parity.check_fixture(str(path))
    rep.print()
    assert not rep.failed
    names = [item[0] for item in rep.items]
    assert any(n.startswith("canonical.loss") or n.startswith("canonical.loss.") for n in names)
    assert any("train_step" in n for n in names)
    assert any(n.startswith("seed-0 weights regenerated") for n in names)


FINGERPRINTS = {
    "resnet32": lambda: plain_network("resnet32", 10),
    "resnet32_GL": lambda: OKDDipBranches("resnet32", 10, 4),
    "resnet32_one": lambda: ONEBranches("resnet32", 10, 4),
    "resnet32_one_ind": lambda: ONEBranches("resnet32", 10, 4, ind=True),
    "resnet32_one_clilr": lambda: ONEBranches("resnet32", 10, 4, avg=True, bpscale=True),
    "resnet32_DML": lambda: IndependentNets("resnet32", 10, 4),
    "resnet32_MulStu": lambda: IndependentNets("resnet32", 10, 4, attention=True),
}


@pytest.mark.parametrize("tag", sorted(FINGERPRINTS))
def test_fingerprint(tag):
    path = SHARED_FIXTURES / "okddip" / f"{tag}.json"
    if not path.exists():
        pytest.skip(f"fingerprint {path} not found")
    ref = json.loads(path.read_text())
    model = FINGERPRINTS[tag]()
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    assert len(list(model.parameters())) == ref["num_parameter_tensors"]
    if "deployed_model_prefixes" in ref:
        deployed = sum(p.numel() for n, p in model.named_parameters()
                       if any(n.startswith(pre) for pre in ref["deployed_model_prefixes"]))
        assert deployed == ref["deployed_model_parameters"]
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    shapes = [o["shape"] for o in ref["forward"]["train_mode_outputs"] if "shape" in o]
    mine = [list(out["pro"].shape)] + ([list(out["x_m"].shape)] if out.get("x_m") is not None else []) + \
        ([list(out["leader"].shape)] if "leader" in out else []) if isinstance(out, dict) else [list(out.shape)]
    assert mine == shapes


@pytest.mark.parametrize("arch,c,gl,one,clilr,dml,mulstu", [
    ("resnet110", 10, 3781496, 3765636, 3765112, 4590952, 4607336),
    ("wide_resnet20_8", 100, 22611936, 22596076, 22595552, None, None),
    ("vgg16", 10, 38157928, 38094452, 38092392, 61014312, 61079848),
    ("densenetd40k12", 100, 233008, 229036, 228784, None, None),
])
def test_parameter_counts(arch, c, gl, one, clilr, dml, mulstu):
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(OKDDipBranches(arch, c)) == gl
    assert n(ONEBranches(arch, c)) == one
    assert n(ONEBranches(arch, c, avg=True)) == clilr
    if dml:
        assert n(IndependentNets(arch, c)) == dml
        assert n(IndependentNets(arch, c, attention=True)) == mulstu


def test_resnet34_and_three_branch_okddip():
    assert sum(p.numel() for p in plain_network("resnet34", 1000).parameters()) == 21797672
    model = OKDDipBranches("resnet32", 10, num_branches=3)  # crashed in the released script
    out = model(torch.randn(4, 3, 32, 32))
    assert out["pro"].shape == (4, 10, 2) and out["attention"].shape == (4, 2, 2)
    loss, terms = okddip_loss(out, torch.tensor([0, 1, 2, 3]), 1.0)
    loss.backward()
    assert model.query_weight.weight.grad is not None  # learns only through the (non-detached) targets


def test_ramp_and_lr_schedule():
    assert ramp_weight(0, 300) == pytest.approx(math.exp(-5))
    assert ramp_weight(40, 300) == pytest.approx(0.2865048, rel=1e-6)
    assert ramp_weight(80, 300) == ramp_weight(200, 300) == 1.0
    lrs = [lr_at(e, 0.1, [150, 225]) for e in (149, 150, 224, 225)]
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.001])  # torch-1.0.1 alignment, not one epoch early


def test_kl_t_has_epsilon_and_t_squared():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    q = torch.softmax(t / 3, 1) + 1e-7
    ref = 9 * (q * (q.log() - torch.log_softmax(s / 3, 1))).sum() / 4
    assert kl_t(s, t, 3.0).item() == pytest.approx(ref.item(), rel=1e-6)


def _run(module, argv, root, run_dir, dataset="CIFAR10"):
    data = os.path.join(root, "imagenet") if dataset == "imagenet" else str(root)
    module.main(list(argv) + ["--dataset", dataset, "--data-root", data, "--run-dir", str(run_dir)] + TINY)
    return read_log(str(run_dir))


@pytest.mark.parametrize("script,flags,key", [
    ("train_GL", [], "test/leader/top1"),
    ("train_GL", ["--MulStu", "--num_branches", "3"], "test/leader/top1"),
    ("train_GL", ["--ensemble"], "test/ensemble/top1"),
    ("train_one", [], "test/gated/top1"),
    ("train_one", ["--avg", "--bpscale"], "test/mean/top1"),
    ("train_one", ["--ind"], "test/mean/top1"),
    ("train_DML", ["--type"], "test/mean/top1"),
])
def test_smoke_methods(script, flags, key, synthetic_root, tmp_path):
    import importlib
    module = importlib.import_module(f"okddip.{script}")
    log = _run(module, flags + ["--num_epochs", "1"], synthetic_root, tmp_path)
    rec = log[-1]
    assert rec["epoch"] == 1 and key in rec and "train/loss" in rec and "test/mean/top1" in rec
    assert math.isfinite(rec["train/loss"])
    for f in ("checkpoint.pt", "last.pth", "best.pth", "test_best_metrics.json", "args.json", "finished"):
        assert (tmp_path / f).exists(), f
    if script == "train_GL" and "--ensemble" not in flags:
        assert "train/attention_self" in rec and "train/kl/leader" in rec and "train/ramp" in rec


def test_loss_falls_and_kd_uses_train_teacher(synthetic_root, tmp_path):
    from okddip import train, train_kd
    teacher = tmp_path / "teacher"
    train.main(["--dataset", "CIFAR10", "--data-root", str(synthetic_root), "--run-dir", str(teacher),
                "--num_epochs", "3", "--steps-per-epoch", "6", "--eval-batches", "1", "--batch_size", "32",
                "--num_workers", "0", "--lr", "0.05", "--seed", "1", "--quiet"])
    log = read_log(str(teacher))
    assert log[-1]["train/loss"] < log[0]["train/loss"]
    student = tmp_path / "student"
    _run(train_kd, ["--T_model", "resnet32", "--T_model_path", str(teacher)], synthetic_root, student)
    rec = read_log(str(student))[-1]
    assert rec["train/teacher_loss"] > 0 and math.isfinite(rec["train/loss"])
    with pytest.raises(SystemExit):  # wrong teacher architecture for these weights: a clear error
        _run(train_kd, ["--T_model", "resnet110", "--T_model_path", str(teacher)], synthetic_root, tmp_path / "x")


def test_resume_is_exact(synthetic_root, tmp_path):
    from okddip import train_GL
    args = ["--num_branches", "3"]
    _run(train_GL, args, synthetic_root, tmp_path / "full")  # 1 epoch; then a second one continued vs straight
    full2 = tmp_path / "full2"
    common = ["--dataset", "CIFAR10", "--data-root", str(synthetic_root), "--steps-per-epoch", "2",
              "--eval-batches", "1", "--batch_size", "8", "--num_workers", "0", "--lr", "0.02", "--seed", "1",
              "--quiet"] + args
    train_GL.main(common + ["--run-dir", str(full2), "--num_epochs", "2"])
    train_GL.main(common + ["--run-dir", str(tmp_path / "full"), "--num_epochs", "2", "--resume"])
    a = torch.load(tmp_path / "full2" / "last.pth", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "full" / "last.pth", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in read_log(str(tmp_path / "full"))] == [1, 2]


@pytest.mark.parametrize("argv,msg", [
    (["--model", "resnet50"], "valid:"),
    (["--num_branches", "2"], "at least"),
    (["--dataset", "MNIST"], None),
])
def test_bad_flags(argv, msg, tmp_path, capsys):
    from okddip import train_GL
    with pytest.raises(SystemExit) as e:
        train_GL.main(argv + ["--run-dir", str(tmp_path / "r")])
    text = str(e.value) + capsys.readouterr().err
    assert msg is None or msg in text
    assert not (tmp_path / "r").exists()  # nothing written


def test_missing_data_is_clear(tmp_path):
    from common.data import DatasetNotFoundError
    from okddip import train
    with pytest.raises(DatasetNotFoundError):
        train.main(["--data-root", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "r")] + TINY)


def test_okddip_on_imagenet_under_torchrun(synthetic_root, tmp_path):
    """Branch-based OKDDip with the ImageNet ResNet-34, 2 gloo processes: rank 0 alone writes one log line."""
    import subprocess
    import sys
    okddip_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "okddip")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train_GL.py", "--dataset", "imagenet", "--model", "resnet34", "--num_epochs", "1",
                          "--steps-per-epoch", "1", "--eval-batches", "1", "--batch_size", "4", "--num_workers", "0",
                          "--data-root", os.path.join(synthetic_root, "imagenet"), "--run-dir", str(tmp_path),
                          "--quiet"], cwd=okddip_dir, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    log = read_log(str(tmp_path))
    assert len(log) == 1 and math.isfinite(log[0]["train/loss"]) and "test/leader/top1" in log[0]
