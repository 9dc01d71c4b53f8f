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

    from common.fast import Fast

    def resolved(device, **given):
        args = Namespace(**{"fast": True, "data_on_device": False, "amp": "none", "channels_last": False,
                            "compile": False, **given})
        fast = Fast.from_args(args, device)
        return fast.data_on_device, fast.amp, fast.channels_last, fast.compile

    assert resolved("cuda") == resolved("cuda:1") == (True, "bf16", True, True)
    assert resolved("cpu") == (False, "none", True, False)  # bf16, compile and device data measured slower there
    assert resolved("cpu", fast=False, amp="bf16", compile=True) == (False, "bf16", False, True)  # no --fast: as given
    assert resolved("cpu", compile=True)[3] and resolved("cpu", compile=True)[2]  # --fast --compile keeps compile


def test_the_fast_value_moves_batches_and_prepares_modules():
    import torch.nn as nn

    from common.fast import Fast, at_least_fp32
    fast = Fast(torch.device("cpu"), channels_last=True)
    x, y = fast.inputs(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    assert x.is_contiguous(memory_format=torch.channels_last) and y.tolist() == [0, 1]
    conv = fast.prepare(nn.Conv2d(3, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not Fast().enabled and Fast(amp="bf16").enabled
    with Fast(amp="bf16").autocast():
        z = nn.Linear(4, 4)(torch.randn(2, 4))
    assert z.dtype == torch.bfloat16 and at_least_fp32(z).dtype == torch.float32
    assert at_least_fp32(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
