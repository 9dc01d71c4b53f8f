"""OKDDip: smoke runs of the VGG-16 and DenseNet-40-12 multi-branch paths, and the fast path (channels_last and
compile keep the losses, bf16 autocast stays close to fp32, CIFAR on the device)."""
import copy
import json

import pytest
import torch

from common.fast import Fast
from common.logging import read_log
from common.options import detached_setup
from okddip import train, train_GL, train_one
from okddip.engine import RecipeRun

TINY = ["--num_epochs", "1", "--steps-per-epoch", "2", "--eval-batches", "1", "--batch_size", "8",
        "--num_workers", "0", "--lr", "0.02", "--seed", "1", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


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


def _method(module, extra):
    args = module.get_args_parser().parse_args(["--model", "resnet32", "--num_branches", "3"] + extra)
    torch.manual_seed(0)
    return module.build(args, 10), args


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def _terms(method, net, x, y, fast=Fast(), epoch=100):
    """Every loss term of one train-mode forward of NET (the run's forward under FAST's autocast)."""
    with fast.autocast():
        out = method.forward(net.train(), x)
    _, terms = method.loss(out, y, epoch)
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
    from common.parity import Report
    method, _ = _method(module, extra)
    model = method.model
    fast_model, double = copy.deepcopy(model), copy.deepcopy(model).double()
    x, y = _batch()
    ref = _terms(method, model, x, y)
    exact = _terms(method, double, x.double(), y)
    channels_last = Fast(channels_last=True)
    fast = _terms(method, channels_last.prepare(fast_model), *channels_last.inputs(x, y))
    assert ref.keys() == fast.keys() == exact.keys()
    report = Report("channels_last")
    report.entries("loss terms", {k: (ref[k], fast[k], exact[k]) for k in ref}, shared_spread=True)
    assert report.ok and not report.not_comparable(), report.format()


@pytest.mark.slow
@pytest.mark.parametrize("module,extra", METHODS[:1], ids=["okddip"])
def test_compile_keeps_every_loss_term_and_the_step(module, extra):
    import dataclasses
    method, args = _method(module, extra)
    model = method.model
    fast_model = copy.deepcopy(model)
    x, y = _batch()
    compiled = Fast(channels_last=True, compile=True)
    ref = _terms(method, model, x, y)
    fast = _terms(method, compiled.prepare(fast_model), *compiled.inputs(x, y))
    for k in ref:
        assert fast[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-5), k
    # One full optimisation step through the compiled module updates the plain module's weights alike. The first
    # step from a fresh init is ill-conditioned in float32 (BN over 8 images): an eager channels_last step alone
    # moves conv1.weight by ~2e-3, so the compiled step must stay within 3x that layout-to-layout spread.
    layout_model = copy.deepcopy(model)
    for m, options in ((model, Fast()), (fast_model, compiled), (layout_model, Fast(channels_last=True))):
        run = RecipeRun(detached_setup(options), args, dataclasses.replace(method, model=m))
        run.on_epoch_start(100)
        run.train_step(0, *options.inputs(x, y))
    plain, stepped, layout = (dict(m.state_dict()) for m in (model, fast_model, layout_model))
    spread = max((plain[k].float() - layout[k].float()).abs().max().item() for k in plain)
    assert 0 < spread < 1e-2  # float32 noise of an ill-conditioned step, not a different update
    for name in plain:
        assert (plain[name].float() - stepped[name].float()).abs().max().item() <= 3 * spread, name


BF16_REL_TOL = 2e-2  # on the total loss and every term above 0.05 (bf16 keeps 8 bits of mantissa)


@pytest.mark.parametrize("module,extra", METHODS, ids=["okddip", "one", "cl-ilr"])
def test_bf16_autocast_stays_close_to_fp32(module, extra):
    method, _ = _method(module, extra)
    x, y = _batch()
    ref = _terms(method, copy.deepcopy(method.model), x, y)
    bf16 = Fast(amp="bf16")
    with bf16.autocast():
        out = method.forward(copy.deepcopy(method.model).train(), x)
    loss, _ = method.loss(out, y, 100)
    assert loss.dtype == torch.float32 and out["x_m"].dtype == torch.float32  # targets and losses in fp32
    fast = _terms(method, copy.deepcopy(method.model), x, y, bf16)  # the fp32 weights before any step
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
