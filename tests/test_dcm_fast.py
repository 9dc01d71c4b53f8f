"""dcm/: the fast path (common.fast) keeps the math: channels_last, compile and bf16 against the fp32 step, the
device-side data in the training script."""
import json

import pytest
import torch
from PIL import Image

from common.data import cifar_datasets, cifar_test_transform
from common.fast import DeviceCifarLoader, Fast
from common.logging import read_log
from common.options import detached_setup
from common.parity import Report
from dcm import main as dcm_main
from dcm.losses import term_names

from test_dcm import script_args

pytestmark = pytest.mark.usefixtures("one_thread")

# bf16 keeps 8 bits of mantissa (eps 7.8e-3): on the fixture batch the forwards under autocast moved the total loss by
# 6e-5 relative and no term by more than 1e-3 of the total (measured on the CPU). The bounds are two bf16 eps.
BF16_TOTAL_RTOL = 2 * torch.finfo(torch.bfloat16).eps
BF16_TERM_ATOL_OF_TOTAL = 2 * torch.finfo(torch.bfloat16).eps


def fixture_batch():
    """The parity fixtures' batch recipe: seed 1, 8 images, 100 classes."""
    torch.manual_seed(1)
    return torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))


def one_step(net2="wrn", method="dcm", *fast, dtype=torch.float32):
    """Build the WRN-16-0.5 pair as the script does and run one training iteration of its DCMRun on the fixture batch,
    in DTYPE, with the fast options FAST (the Fast value main() would build from them)."""
    args = script_args("--depth", "16", "--width", "0.5", "--seed", "0", "--net2", net2, "--method", method,
                       "--device", "cpu", *fast)
    nets = [net.to(dtype) for net in dcm_main.build_networks(args, 100)]
    before = [{k: v.clone() for k, v in net.state_dict().items()} for net in nets]
    fast_path = Fast.from_args(args, "cpu")
    run = dcm_main.DCMRun(detached_setup(fast_path), args, nets)
    run.on_epoch_start(0)
    x, y = fast_path.inputs(*fixture_batch())
    outputs, terms, loss = run.iteration(x.to(dtype), y)
    updates = {f"net{i + 1}.{k}": v - b[k] for i, (net, b) in enumerate(zip(nets, before))
               for k, v in net.state_dict().items() if v.is_floating_point()}
    return torch.stack([t.detach() for t in terms]), loss.detach(), updates, term_names(outputs, method != "baseline")


def fast_path_report(net2, method, *fast):
    """The fast path's step (float32, and float64 through the same kernels' path) against the faithful float32 step,
    with the parity rule (common/parity.py): the faithful step is another float32 evaluation of the same math, so it
    must lie within the fast path's own measured float32 rounding of the exact value. A fast path that changes the
    math moves its float64 result away from it."""
    fast32, fast64, faithful = one_step(net2, method, *fast), one_step(net2, method, *fast, dtype=torch.float64), \
        one_step(net2, method)
    names = fast32[3]
    report = Report(f"{' '.join(fast)} vs the faithful step, {net2} partner, {method}")
    report.entries("loss terms", {n: (fast32[0][i], faithful[0][i], fast64[0][i]) for i, n in enumerate(names)},
                   shared_spread=True)
    report.float32("total loss", fast32[1], faithful[1], fast64[1])
    report.entries("SGD updates and BN running-stat changes",
                   {k: (fast32[2][k], faithful[2][k], fast64[2][k]) for k in fast32[2]})
    print(report.format())
    return report


@pytest.mark.parametrize("method", ["dcm", "dml"])
def test_channels_last_step_equals_faithful_step(method):
    report = fast_path_report("wrn", method, "--channels-last")
    assert report.ok and not report.not_comparable(), report.format()


@pytest.mark.slow
def test_channels_last_step_equals_faithful_step_with_mobilenet():
    # MobileNet's first SGD step is ill-conditioned (dcm/README.md, Parity): its chaotic entries are not comparable.
    report = fast_path_report("mobilenet", "dcm", "--channels-last")
    assert report.ok and "loss terms" not in report.not_comparable(), report.format()


@pytest.mark.slow
def test_compiled_channels_last_step_equals_faithful_step():
    report = fast_path_report("wrn", "dcm", "--channels-last", "--compile")
    assert report.ok and not report.not_comparable(), report.format()


def test_bf16_autocast_stays_within_stated_tolerance_of_fp32():
    terms32, loss32, _, names = one_step("wrn", "dcm")
    terms16, loss16, _, _ = one_step("wrn", "dcm", "--amp", "bf16")
    assert terms16.dtype == torch.float32  # the softmaxes, CEs and KLs run in fp32 on bf16 logits
    assert abs(loss16 - loss32) <= BF16_TOTAL_RTOL * abs(loss32), (loss16, loss32)
    worst = (terms16 - terms32).abs().max()
    assert worst <= BF16_TERM_ATOL_OF_TOTAL * abs(loss32), (names[int((terms16 - terms32).abs().argmax())], worst)
    assert not torch.equal(terms16, terms32)  # autocast was really on


def test_fast_flag_turns_on_the_device_s_fast_options_and_defaults_stay_off():
    options = ("data_on_device", "amp", "channels_last", "compile")
    default = Fast.from_args(script_args(), "cpu")
    assert [getattr(default, k) for k in options] == [False, "none", False, False]
    fast = Fast.from_args(script_args("--fast"), "cuda")
    assert [getattr(fast, k) for k in options] == [True, "bf16", True, True]
    fast = Fast.from_args(script_args("--fast"), "cpu")  # only what measured faster on the CPU
    assert [getattr(fast, k) for k in options] == [False, "none", True, False]


def test_device_loaders_have_the_released_data_semantics(synthetic_root):
    args = script_args("--data-root", str(synthetic_root), "--data-on-device", "--batch_size", "64")
    train, test = dcm_main.cifar_loaders(args, *dcm_main.cifar_sets(args), Fast.from_args(args, "cpu"))
    assert isinstance(train, DeviceCifarLoader) and isinstance(test, DeviceCifarLoader)
    assert (train.padding_mode, train.order, train.shuffle, train.drop_last, train.train) == (
        "reflect", "pad_flip_crop", True, False, True)
    assert (test.shuffle, test.drop_last, test.train) == (False, False, False)
    assert train.mean == dcm_main.MEAN and train.std == dcm_main.STD  # CIFAR-10 statistics, as released
    _, test_set = cifar_datasets("CIFAR100", synthetic_root, None, None)
    x, y = next(iter(test))
    ref = torch.stack([cifar_test_transform(dcm_main.MEAN, dcm_main.STD)(Image.fromarray(test_set.data[k]))
                       for k in range(64)])
    assert torch.allclose(x, ref, atol=1e-6) and y.tolist() == test_set.targets[:64]
    assert len(train) == -(-len(train.labels) // 64)  # no drop_last: the last, smaller batch is trained on


def run_main(tmp_path, synthetic_root, name, *extra):
    run_dir = tmp_path / name
    dcm_main.main(["--depth", "16", "--width", "0.5", "--batch_size", "8", "--nthread", "0", "--eval-batches", "1",
                   "--data-root", str(synthetic_root), "--run-dir", str(run_dir), "--seed", "1", "--quiet",
                   "--device", "cpu", "--print_freq", "2", *extra])
    return run_dir


def test_smoke_data_on_device_loss_falls_and_logs(tmp_path, synthetic_root):
    run = run_main(tmp_path, synthetic_root, "dev", "--data-on-device", "--channels-last", "--epochs", "2",
                   "--steps-per-epoch", "3")
    log = read_log(run)
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[1]["train/loss"] < log[0]["train/loss"]
    assert sum(k.startswith("train/kl/") for k in log[0]) == 18 and "test/net2/aux2/top1" in log[0]
    options = json.loads((run / "args.json").read_text())
    assert options["data_on_device"] is True and options["channels_last"] is True and options["amp"] == "none"
    assert "generator" in torch.load(run / "checkpoint.pt", weights_only=False)["loader"]
