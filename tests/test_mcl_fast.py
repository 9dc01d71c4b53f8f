"""L-MCL fast path (issue 7): the same losses with channels_last (and compile, slow), bf16 autocast within a stated
tolerance of fp32, the device loader keeps the class-balanced batches, and the scripts run with --data-on-device."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.data import ClassBalancedSampler
from common.fast import DeviceCifarLoader, Fast
from common.options import detached_setup
from common.parity import F64, Report
from common.logging import read_log
from mcl.lmcl import training_loss
from mcl.models import Aggregator, EmbedHeads, LossWeightNetwork, build_cifar_baseline, build_cifar_pair
from mcl.runs import BaselineRun
from mcl.train_utils import LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD

TERMS = ("total", "loss_cls", "loss_logit_kd", "vcl", "soft_vcl", "icl", "soft_icl")
# bf16 keeps 8 mantissa bits: through a 32-layer network and 18 contrast pairs the total loss of this fixture batch
# moves by well under 1 % (about 0.2 % measured); 2e-2 relative is the bound asserted.
BF16_RTOL = 2e-2


def lmcl_modules(seed=0):
    torch.manual_seed(seed)
    pair = build_cifar_pair("lmcl_resnet32_cifar")
    return pair, EmbedHeads([64, 64], 3), Aggregator([64, 64], 3), LossWeightNetwork([[64] * 3] * 2)


def fixture_batch(batch=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.arange(batch // 2).repeat_interleave(2)


ARGS = SimpleNamespace(kd_T=3.0, tau=0.1, alpha=0.1, gamma=1.0, beta=0.1, lam=1.0)


def losses_of(fast, dtype=torch.float32, reverse=False):
    """Loss terms and the pair's flattened gradient for the fixture batch with the Fast value FAST (REVERSE: the
    batch in reverse order, the same math summed in another order)."""
    pair, embed, aggregator, weight_net = (m.to(dtype) for m in lmcl_modules())
    pair.train()
    forward = fast.prepare(pair)
    x, y = fixture_batch()
    x = x.to(dtype)
    if reverse:
        x, y = x.flip(0), y.flip(0)
    x, y = fast.inputs(x, y)
    out = training_loss(forward, embed, aggregator, weight_net, x, y, ARGS, autocast=fast.autocast)
    out["total"].backward()
    grad = torch.cat([p.grad.flatten() for p in pair.parameters() if p.grad is not None])
    return {k: out[k].detach().double() for k in TERMS}, grad


PLAIN = Fast()
CHANNELS_LAST = Fast(channels_last=True)


def test_channels_last_gives_the_same_losses_and_gradients():
    """channels_last picks other kernels. In float64 both layouts must give the same losses and gradients to float64
    rounding (the same math); in float32 the channels_last losses must be within the tolerance that the parity rule
    (common.parity) derives from the measured float32 rounding of the plain layout (its batch in both orders)."""
    plain64, grad_plain = losses_of(PLAIN, dtype=torch.float64)
    fast64, grad_fast = losses_of(CHANNELS_LAST, dtype=torch.float64)
    for k in TERMS:
        assert abs(fast64[k] - plain64[k]) <= F64["loss"] * abs(plain64[k]), (k, plain64[k], fast64[k])
    assert (grad_plain - grad_fast).norm() / grad_plain.norm() < F64["output"]
    plain32, _ = losses_of(PLAIN)
    reversed32, _ = losses_of(PLAIN, reverse=True)
    fast32, _ = losses_of(CHANNELS_LAST)
    report = Report("channels_last against the plain layout")
    report.entries("losses", {k: (plain32[k], fast32[k], plain64[k]) for k in TERMS}, shared_spread=True,
                   also={k: [reversed32[k]] for k in TERMS})
    assert report.ok, report.format()


@pytest.mark.slow
def test_compile_gives_the_same_losses():
    plain, _ = losses_of(PLAIN)
    fast, _ = losses_of(Fast(channels_last=True, compile=True))
    for k in TERMS:
        assert torch.allclose(plain[k], fast[k], rtol=1e-4, atol=1e-5), (k, plain[k], fast[k])


def test_bf16_autocast_stays_close_to_fp32_and_losses_are_fp32():
    fp32, _ = losses_of(PLAIN)
    bf16, _ = losses_of(Fast(amp="bf16"))
    assert torch.isfinite(bf16["total"])
    assert abs(bf16["total"] - fp32["total"]) / fp32["total"] < BF16_RTOL
    for k in ("loss_cls", "loss_logit_kd", "icl", "vcl"):
        assert abs(bf16[k] - fp32[k]) / fp32[k].abs() < 5 * BF16_RTOL, k


def test_bf16_baseline_step_computes_the_loss_in_fp32():
    torch.manual_seed(0)
    model = build_cifar_baseline("resnet32_cifar")
    fast = Fast(amp="bf16")
    with torch.no_grad(), fast.autocast():
        assert model.train()(fixture_batch()[0])[1].dtype == torch.bfloat16
    args = SimpleNamespace(init_lr=0.0, weight_decay=0.0)
    x, y = fixture_batch()
    with torch.no_grad():
        reference = torch.nn.functional.cross_entropy(model.train()(x)[1], y)
    loss = BaselineRun(detached_setup(fast), args, model, None).train_step(0, x, y)["loss"]
    assert loss.dtype == torch.float32
    assert abs(loss.item() - reference.item()) / reference.item() < BF16_RTOL


def test_device_loader_keeps_the_class_balanced_batches():
    labels = np.repeat(np.arange(10), 6)
    data = SimpleNamespace(data=np.random.RandomState(0).randint(0, 256, (60, 32, 32, 3), dtype=np.uint8),
                           targets=labels.tolist())
    np.random.seed(0)
    sampler = ClassBalancedSampler(labels, m=2, batch_size=8)
    loader = DeviceCifarLoader(data, 8, "cpu", LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD, train=True, sampler=sampler,
                               channels_last=True)
    batches = list(loader)
    assert len(batches) == len(sampler) // 8 == 7
    for x, y in batches:
        assert x.shape == (8, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y[0::2], y[1::2]) and len(set(y.tolist())) == 4  # 4 classes x 2 images


@pytest.mark.slow  # two script runs (~15 s); the device loader itself is tested above
def test_lmcl_and_baseline_run_with_data_on_device(synthetic_root, tmp_path):
    from test_mcl import BASELINE_SMOKE, LMCL_SMOKE, run_script
    run = tmp_path / "lmcl"
    run_script("main_layer_mcl_cifar_meta.py", LMCL_SMOKE + ["--epochs", "1", "--data-root", synthetic_root,
                                                             "--run-dir", run, "--data-on-device", "--device", "cpu",
                                                             "--channels-last"])
    (record,) = read_log(run)
    assert np.isfinite(record["train/loss"]) and "test/max_heads/top1" in record
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert "loader" in ckpt and ckpt["run"]["net"]["module_list.0.backbone.bn1.num_batches_tracked"].item() == 3
    run = tmp_path / "baseline"
    run_script("main_cifar_baseline.py", BASELINE_SMOKE + ["--epochs", "3", "--steps-per-epoch", "10", "--data-root",
                                                           synthetic_root, "--run-dir", run, "--data-on-device",
                                                           "--device", "cpu"])
    log = read_log(run)
    assert log[-1]["train/loss"] < log[0]["train/loss"]
    import json
    saved = json.loads((run / "args.json").read_text())
    assert saved.get("data_on_device") is True or saved.get("args", {}).get("data_on_device") is True
