"""FFSD fast path: channels_last / compile give the faithful losses (within the parity rule's tolerance: 8 x our own
measured float32-vs-float64 spread), bf16 autocast stays close, and a training run with CIFAR on the device (augmented
there) logs falling losses and resumes exactly."""
import json

import pytest
import torch

from common.fast import Fast
from common.logging import read_log
from common.parity import Report
from ffsd.training import build_networks, build_optimizers, prepare_networks, train_step, warmed_up_lambdas

from test_ffsd_runs import assert_same_run, killed

pytestmark = pytest.mark.usefixtures("one_thread")

LAMBDAS = {"diversity": 1e-5, "fusion": 10.0, "self_distillation": 1000.0}
NETWORK_TOTALS = ("student0/total", "student1/total", "fusion/total", "leader/total")
BF16_TOLERANCE = 2e-2  # relative, per network's total loss and on their sum, at the same weights


def fixture_batch():
    """A batch drawn as the reference fixtures draw theirs (seed 1: 8 images, then CIFAR-100 labels)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 100, (8,), generator=g)


def one_step(channels_last=False, compile=False, amp="none", dtype=torch.float32):
    """Loss terms of one iteration from seed-0 weights, and every network's state afterwards."""
    fast = Fast(torch.device("cpu"), amp=amp, channels_last=channels_last, compile=compile)
    torch.manual_seed(0)
    nets = build_networks("resnet20").to(dtype)
    forward = prepare_networks(nets, fast)
    x, y = fixture_batch()
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    nets.train()
    terms, _ = train_step(nets, build_optimizers(nets), x, y, warmed_up_lambdas(LAMBDAS, 6), forward=forward,
                          autocast=fast.autocast)
    return terms, nets.state_dict()


@pytest.fixture(scope="module")
def faithful():
    return one_step()


@pytest.fixture(scope="module")
def faithful64():
    return one_step(dtype=torch.float64)[0]


def assert_same_terms(fast, faithful, faithful64):
    """FAST (another float32 evaluation: other kernels, other summation orders) within the parity rule of the
    float64 terms: 8 x max(our default float32 spread, 4 eps), the spread shared over the scalar terms."""
    assert fast.keys() == faithful.keys()
    report = Report("fast path")
    report.entries("loss terms", {k: (faithful[k], fast[k], faithful64[k]) for k in faithful}, shared_spread=True)
    assert report.ok and not report.not_comparable(), report.format()


def test_channels_last_gives_the_faithful_losses(faithful, faithful64):
    terms, state = one_step(channels_last=True)
    assert_same_terms(terms, faithful[0], faithful64)
    # the plain modules still hold the weights (what checkpoints save), with the same keys
    assert state.keys() == faithful[1].keys()


@pytest.mark.slow  # torch.compile of six networks takes minutes on the CPU
def test_compile_and_channels_last_give_the_faithful_losses(faithful, faithful64):
    terms, _ = one_step(channels_last=True, compile=True)
    assert_same_terms(terms, faithful[0], faithful64)


def test_bf16_autocast_stays_close_to_fp32(faithful):
    terms, _ = one_step(amp="bf16")
    reference = faithful[0]
    for name in NETWORK_TOTALS:
        assert terms[name].item() == pytest.approx(reference[name].item(), rel=BF16_TOLERANCE), name
    total = sum(terms[n] for n in NETWORK_TOTALS).item()
    assert total == pytest.approx(sum(reference[n] for n in NETWORK_TOTALS).item(), rel=BF16_TOLERANCE)
    assert all(torch.isfinite(v) for v in terms.values())


FAST = ["--model", "resnet20", "--lr", "0.02", "--steps-per-epoch", "3", "--eval-batches", "1", "--n_epochs", "4",
        "--train_batch_size", "8", "--test_batch_size", "8", "--quiet", "--seed", "1", "--data-on-device",
        "--device", "cpu", "--save-every-steps", "2"]


def test_data_on_device_run_logs_falling_loss_and_resumes_exactly(synthetic_root, tmp_path):
    from ffsd.train import main
    full, split = tmp_path / "full", tmp_path / "split"
    main(FAST + ["--data-root", str(synthetic_root), "--run-dir", str(full)])
    assert json.loads((full / "args.json").read_text())["data_on_device"] is True
    records = read_log(full)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    assert (full / "finished").exists() and (full / "checkpoints" / "modelleader_best.pth").exists()
    # killed inside epoch 3 after its mid-epoch checkpoint: the device loader's generator is checkpointed with the
    # epoch's start state, so the resumed run draws the same order and augmentation
    assert killed(FAST + ["--data-root", str(synthetic_root), "--run-dir", str(split)], 8) == -9
    main(FAST + ["--data-root", str(synthetic_root), "--run-dir", str(split), "--resume"])
    assert_same_run(full, split)
