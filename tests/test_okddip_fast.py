"""OKDDip: exact mid-epoch resume after SIGKILL, smoke runs of the VGG-16 and DenseNet-40-12 multi-branch paths, and
the fast path (channels_last and compile keep the losses, bf16 autocast stays close to fp32, CIFAR on the device)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from common.logging import read_log
from okddip import train, train_GL, train_one
from okddip.engine import make_optimizer, optimize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num_epochs", "1", "--steps-per-epoch", "2", "--eval-batches", "1", "--batch_size", "8",
        "--num_workers", "0", "--lr", "0.02", "--seed", "1", "--quiet"]


@pytest.fixture(autouse=True)
def one_thread():
    """Batches of 8: one thread is as fast alone and much faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _final_weights(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["model"]


def _log_without_times(run_dir):
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_s")} for r in read_log(str(run_dir))]


# Runs train_GL.main with the engine's step wrapped to SIGKILL the process right after global step KILL_AT_STEP.
KILLING_RUN = """
import os, signal, sys
from okddip import engine, train_GL
kill_at, done, step = int(os.environ.get("KILL_AT_STEP", "0")), [0], engine.optimize
def optimize(*args):
    result = step(*args)
    done[0] += 1
    if done[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
engine.optimize = optimize
train_GL.main(sys.argv[1:])
"""


def test_sigkill_mid_epoch_then_resume_is_bit_identical(synthetic_root, tmp_path):
    """3 steps per epoch, a checkpoint every 2 steps; killed after global step 6 (the 3rd step of epoch 2, one step
    after the mid-epoch checkpoint), then resumed: weights and log equal those of an uninterrupted run."""
    argv = [sys.executable, "-c", KILLING_RUN, "--model", "resnet32", "--num_branches", "3", "--dataset",
            "CIFAR10", "--data-root", str(synthetic_root), "--num_epochs", "2", "--steps-per-epoch", "3",
            "--eval-batches", "1", "--batch_size", "8", "--num_workers", "0", "--lr", "0.02", "--seed", "1",
            "--quiet", "--save-every-steps", "2"]

    def run(run_dir, *extra, kill_at=None):
        env = dict(os.environ, OMP_NUM_THREADS="1", KILL_AT_STEP=str(kill_at or 0))
        return subprocess.run(argv + ["--run-dir", str(run_dir), *extra], env=env, cwd=REPO, capture_output=True,
                              text=True)

    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    killed = run(tmp_path / "killed", kill_at=6)
    assert killed.returncode == -9, killed.stderr  # SIGKILL
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["epoch_state"]["step"] == 2  # mid-epoch checkpoint of epoch 2
    assert not (tmp_path / "killed" / "finished").exists()
    resumed = run(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _log_without_times(tmp_path / "straight") == _log_without_times(tmp_path / "killed")


@pytest.mark.parametrize("module,flags,key", [
    pytest.param(train_one, ["--model", "vgg16"], "test/gated/top1",  # ONE on VGG-16: double pass, dropout
                 marks=pytest.mark.slow),
    (train_GL, ["--model", "densenetd40k12"], "test/leader/top1"),  # OKDDip on the shared-block DenseNet
])
def test_smoke_vgg16_and_densenet(module, flags, key, synthetic_root, tmp_path):
    module.main(flags + ["--dataset", "CIFAR100", "--data-root", str(synthetic_root), "--run-dir", str(tmp_path)]
                + TINY)
    rec = read_log(str(tmp_path))[-1]
    assert rec["epoch"] == 1 and key in rec and torch.isfinite(torch.tensor(rec["train/loss"]))


def _model_and_step(module, extra, **fast):
    args = module.parser().parse_args(["--model", "resnet32", "--num_branches", "3"] + extra)
    for k, v in fast.items():
        setattr(args, k, v)
    torch.manual_seed(0)
    model, step = module.build(args, 10)[:2]
    return model, step, args


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def _terms(step, net, x, y, epoch=100):
    loss, terms, _ = step(net, x, y, epoch)
    flat = {}
    for k, v in terms.items():
        for i, t in enumerate(v if isinstance(v, list) else [v]):
            flat[f"{k}{i}"] = t.item() if torch.is_tensor(t) else float(t)
    return flat


METHODS = [(train_GL, []), (train_one, []), (train_one, ["--avg", "--bpscale"])]


@pytest.mark.parametrize("module,extra", METHODS, ids=["okddip", "one", "cl-ilr"])
def test_channels_last_keeps_every_loss_term(module, extra):
    """channels_last picks other kernels: its loss terms must be as close to the float64 values as the default
    float32 path is (common.parity's rule: 8 x the measured float32-vs-float64 spread, shared by the terms)."""
    from common.fast import prepare_model
    from common.parity import Report
    model, step, args = _model_and_step(module, extra)
    fast_model, double = copy.deepcopy(model), copy.deepcopy(model).double()
    x, y = _batch()
    ref = _terms(step, model.train(), x, y)
    exact = _terms(step, double.train(), x.double(), y)
    args.channels_last = True
    fast = _terms(step, prepare_model(fast_model.train(), args), x.contiguous(memory_format=torch.channels_last), y)
    assert ref.keys() == fast.keys() == exact.keys()
    report = Report("channels_last")
    report.entries("loss terms", {k: (ref[k], fast[k], exact[k]) for k in ref}, shared_spread=True)
    assert report.ok and not report.not_comparable(), report.format()


@pytest.mark.slow
@pytest.mark.parametrize("module,extra", METHODS[:1], ids=["okddip"])
def test_compile_keeps_every_loss_term_and_the_step(module, extra):
    from common.fast import prepare_model
    model, step, args = _model_and_step(module, extra)
    fast_model = copy.deepcopy(model)
    x, y = _batch()
    args.channels_last, args.compile = True, True
    net = prepare_model(fast_model.train(), args)
    ref = _terms(step, model.train(), x, y)
    fast = _terms(step, net, x.contiguous(memory_format=torch.channels_last), y)
    for k in ref:
        assert fast[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-5), k
    # One full optimisation step through the compiled module updates the plain module's weights alike. The first
    # step from a fresh init is ill-conditioned in float32 (BN over 8 images): an eager channels_last step alone
    # moves conv1.weight by ~2e-3, so the compiled step must stay within 3x that layout-to-layout spread.
    layout_model = copy.deepcopy(model)
    layout_args = copy.copy(args)
    layout_args.compile = False
    layout_net = prepare_model(layout_model.train(), layout_args)
    for m, n, xb in ((model, model, x), (fast_model, net, x.contiguous(memory_format=torch.channels_last)),
                     (layout_model, layout_net, x.contiguous(memory_format=torch.channels_last))):
        optimize(n, make_optimizer(m, args), step, xb, y, 100)
    plain, compiled, layout = (dict(m.state_dict()) for m in (model, fast_model, layout_model))
    spread = max((plain[k].float() - layout[k].float()).abs().max().item() for k in plain)
    assert 0 < spread < 1e-2  # float32 noise of an ill-conditioned step, not a different update
    for name in plain:
        assert (plain[name].float() - compiled[name].float()).abs().max().item() <= 3 * spread, name


BF16_REL_TOL = 2e-2  # on the total loss and every term above 0.05 (bf16 keeps 8 bits of mantissa)


@pytest.mark.parametrize("module,extra", METHODS, ids=["okddip", "one", "cl-ilr"])
def test_bf16_autocast_stays_close_to_fp32(module, extra):
    model, step, args = _model_and_step(module, extra)
    fast_model = copy.deepcopy(model)
    x, y = _batch()
    ref = _terms(step, model.train(), x, y)
    args.amp = "bf16"
    loss, _, out = step(fast_model.train(), x, y, 100)
    assert loss.dtype == torch.float32 and out["x_m"].dtype == torch.float32  # targets and losses in fp32
    fast = _terms(step, copy.deepcopy(model).train(), x, y)  # model: fp32 weights before any step
    assert fast["total_loss0"] == pytest.approx(ref["total_loss0"], rel=BF16_REL_TOL)
    for k in ref:
        assert fast[k] == pytest.approx(ref[k], rel=BF16_REL_TOL, abs=0.05 * BF16_REL_TOL), k
    assert fast != ref  # autocast did run in bf16


def test_data_on_device_run_logs_and_learns(synthetic_root, tmp_path):
    train.main(["--dataset", "CIFAR10", "--data-root", str(synthetic_root), "--run-dir", str(tmp_path),
                "--num_epochs", "2", "--steps-per-epoch", "4", "--eval-batches", "1", "--batch_size", "32",
                "--num_workers", "0", "--lr", "0.05", "--seed", "1", "--quiet", "--data-on-device",
                "--device", "cpu"])
    log = read_log(str(tmp_path))
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[-1]["train/loss"] < log[0]["train/loss"]
    with open(tmp_path / "args.json") as f:
        recorded = json.load(f)
    recorded = recorded.get("args", recorded)
    assert recorded["data_on_device"] is True and recorded["amp"] == "none"
