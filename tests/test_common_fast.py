import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from common.data import CIFAR100_MEAN, CIFAR100_STD, ClassBalancedSampler, cifar_datasets, cifar_test_transform
from common.fast import DeviceCifarLoader, device_augment, normalize


@pytest.mark.parametrize("padding_mode", ["reflect", "constant"])
@pytest.mark.parametrize("order", ["crop_flip", "pad_flip_crop"])
def test_device_augmentation_matches_torchvision_pixels(padding_mode, order):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    offsets = torch.tensor(rng.integers(0, 9, size=(12, 2)))
    flips = torch.tensor(rng.random(12) < 0.5)
    ours = normalize(device_augment(torch.from_numpy(images).permute(0, 3, 1, 2), offsets, flips, padding_mode, order),
                     CIFAR100_MEAN, CIFAR100_STD)
    for k in range(12):
        img = TF.pad(Image.fromarray(images[k]), 4, fill=0, padding_mode=padding_mode)
        i, j = offsets[k].tolist()
        if order == "pad_flip_crop":
            img = TF.crop(TF.hflip(img) if flips[k] else img, i, j, 32, 32)
        else:
            img = TF.crop(img, i, j, 32, 32)
            img = TF.hflip(img) if flips[k] else img
        expected = TF.normalize(TF.to_tensor(img), CIFAR100_MEAN, CIFAR100_STD)
        assert torch.allclose(ours[k], expected, atol=1e-6), k


def test_device_loader_offsets_and_flips_have_the_right_distribution(synthetic_root, monkeypatch):
    train, _ = cifar_datasets("cifar100", synthetic_root, None, None)
    seen = {"offsets": [], "flips": []}
    import common.fast as fast
    real = fast.device_augment

    def spy(images, offsets, flips, padding_mode, order):
        seen["offsets"].append(offsets)
        seen["flips"].append(flips)
        return real(images, offsets, flips, padding_mode, order)

    monkeypatch.setattr(fast, "device_augment", spy)
    loader = DeviceCifarLoader(train, 128, "cpu", CIFAR100_MEAN, CIFAR100_STD, train=True, shuffle=True, seed=0)
    for _ in range(10):
        for _ in loader:
            pass
    offsets = torch.cat(seen["offsets"]).flatten()
    flips = torch.cat(seen["flips"]).float()
    counts = torch.bincount(offsets, minlength=9).float()
    assert offsets.min() == 0 and offsets.max() == 8
    expected = len(offsets) / 9
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 26.1  # 8 degrees of freedom, p = 0.001
    assert abs(flips.mean().item() - 0.5) < 4 * (0.25 / len(flips)) ** 0.5


def test_device_loader_order_semantics(synthetic_root):
    train, test = cifar_datasets("cifar100", synthetic_root, None, None)
    seq = DeviceCifarLoader(test, 64, "cpu", CIFAR100_MEAN, CIFAR100_STD, train=False)
    assert len(seq) == 4  # 200 images, drop_last False
    x, y = next(iter(seq))
    ref = torch.stack([cifar_test_transform(CIFAR100_MEAN, CIFAR100_STD)(Image.fromarray(test.data[k]))
                       for k in range(64)])
    assert torch.allclose(x, ref, atol=1e-6) and y.tolist() == test.targets[:64]
    dropped = DeviceCifarLoader(train, 128, "cpu", CIFAR100_MEAN, CIFAR100_STD, train=True, shuffle=True,
                                drop_last=True)
    assert len(dropped) == 4 and sum(len(b[1]) for b in dropped) == 512
    sampler = ClassBalancedSampler(train.targets, m=2, batch_size=128)
    balanced = DeviceCifarLoader(train, 128, "cpu", CIFAR100_MEAN, CIFAR100_STD, train=True, sampler=sampler)
    for _, labels in balanced:
        assert (labels[0::2] == labels[1::2]).all() and len(set(labels.tolist())) == 64


def test_fast_turns_on_what_helps_on_the_run_s_device():
    from argparse import Namespace

    from common.fast import resolve_fast_args

    def resolved(device, **given):
        args = Namespace(fast=True, device=device, data_on_device=False, amp="none", channels_last=False,
                         compile=False, **given)
        resolve_fast_args(args)
        return args.data_on_device, args.amp, args.channels_last, args.compile

    assert resolved("cuda") == resolved("cuda:1") == (True, "bf16", True, True)
    assert resolved("cpu") == (False, "none", True, False)  # bf16, compile and device data measured slower there
    given = Namespace(fast=False, device="cpu", data_on_device=False, amp="bf16", channels_last=False, compile=True)
    assert resolve_fast_args(given).amp == "bf16" and given.compile and not given.channels_last  # no --fast: as given
    args = Namespace(fast=True, device="cpu", data_on_device=False, amp="none", channels_last=False, compile=True)
    assert resolve_fast_args(args).compile and args.channels_last  # --fast --compile on the CPU keeps compile


def test_ffsd_fast_follows_the_device_its_gpu_ids_pick():
    from ffsd.options import parse
    args = parse(["--fast", "--gpu_ids", "-1"])
    assert args.device == "cpu" and (args.data_on_device, args.amp, args.channels_last, args.compile) == \
        (False, "none", True, False)
