import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from common.data import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, ClassBalancedSampler,
                         DatasetNotFoundError, SYNTHETIC_MARKER, cifar_datasets, cifar_test_transform,
                         cifar_train_transform, imagenet_datasets, imagenet_train_transform, imagenet_val_transform,
                         make_loader)
from common.meters import Meter, topk_accuracy, topk_correct
from common.synthetic import write_cifar


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


def _normalise(arr, mean, std):
    x = torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.mark.parametrize("padding_mode,np_mode", [("reflect", "reflect"), ("constant", "constant")])
@pytest.mark.parametrize("order", ["pad_flip_crop", "crop_flip"])
def test_train_transform_pixels_match_hand_computation(padding_mode, np_mode, order):
    """Pad mode, draw order of flip and crop offsets, and normalisation, checked against a numpy re-derivation."""
    arr = _image()
    tf = cifar_train_transform(CIFAR100_MEAN, CIFAR100_STD, padding_mode, order)
    for seed in range(6):
        torch.manual_seed(seed)
        out = tf(Image.fromarray(arr))
        torch.manual_seed(seed)
        if order == "pad_flip_crop":  # RNG: flip first, then crop offsets
            flip = torch.rand(1).item() < 0.5
            i, j = torch.randint(0, 9, (1,)).item(), torch.randint(0, 9, (1,)).item()
        else:  # crop offsets first, then flip
            i, j = torch.randint(0, 9, (1,)).item(), torch.randint(0, 9, (1,)).item()
            flip = torch.rand(1).item() < 0.5
        padded = np.pad(arr, ((4, 4), (4, 4), (0, 0)), mode=np_mode)
        if order == "pad_flip_crop":
            crop = (padded[:, ::-1] if flip else padded)[i:i + 32, j:j + 32]
        else:
            crop = padded[i:i + 32, j:j + 32]
            crop = crop[:, ::-1] if flip else crop
        expected = _normalise(np.ascontiguousarray(crop), CIFAR100_MEAN, CIFAR100_STD)
        assert torch.allclose(out, expected, atol=1e-6), (seed, order, padding_mode)


def test_reflect_padding_does_not_repeat_the_edge_pixel():
    arr = _image(1)
    torch.manual_seed(0)
    tf = torchvision.transforms.Pad(4, padding_mode="reflect")
    padded = np.asarray(tf(Image.fromarray(arr)))
    assert np.array_equal(padded[4, 3], arr[0, 1])  # mirror excludes the edge (torchvision 'reflect')
    assert not np.array_equal(cifar_train_transform(CIFAR10_MEAN, CIFAR10_STD, "constant").transforms[0].padding_mode,
                              "reflect")


def test_test_transform_normalises_with_given_constants():
    arr = _image(2)
    out = cifar_test_transform(CIFAR10_MEAN, CIFAR10_STD)(Image.fromarray(arr))
    assert torch.allclose(out, _normalise(arr, CIFAR10_MEAN, CIFAR10_STD), atol=1e-6)


def test_unknown_order_is_refused():
    with pytest.raises(ValueError, match="pad_flip_crop"):
        cifar_train_transform(CIFAR10_MEAN, CIFAR10_STD, order="flip_pad")


def test_synthetic_cifar_reads_back_through_torchvision(synthetic_root):
    train, test = cifar_datasets("CIFAR100", synthetic_root, None, None)
    assert isinstance(train, torchvision.datasets.CIFAR100)
    assert len(train) == 600 and len(test) == 200 and len(train.classes) == 100
    assert train.data.shape == (600, 32, 32, 3) and train.data.dtype == np.uint8
    assert sorted(set(train.targets)) == list(range(100))
    train10, test10 = cifar_datasets("cifar10", synthetic_root, None, None)
    assert len(train10) == 600 and train10.classes[0] == "airplane" and sorted(set(test10.targets)) == list(range(10))
    img, label = train10[0]
    assert img.size == (32, 32) and 0 <= label < 10


def test_synthetic_classes_are_learnable(synthetic_root):
    """Nearest class-mean on the train set classifies the test set far above chance."""
    train, test = cifar_datasets("cifar10", synthetic_root, None, None)
    x, y = train.data.reshape(len(train), -1).astype(np.float32), np.array(train.targets)
    means = np.stack([x[y == c].mean(0) for c in range(10)])
    xt = test.data.reshape(len(test), -1).astype(np.float32)
    pred = ((xt[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == np.array(test.targets)).mean() > 0.9


def test_real_folder_keeps_md5_check(tmp_path):
    folder = write_cifar(tmp_path, "cifar10")
    os.remove(os.path.join(folder, SYNTHETIC_MARKER))  # now it claims to be the real archive: md5 must fail
    with pytest.raises(DatasetNotFoundError):
        cifar_datasets("CIFAR10", tmp_path, None, None)


def test_missing_dataset_message_names_folder_archive_and_flag(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        cifar_datasets("CIFAR100", tmp_path / "nowhere", None, None, flag="--dataroot")
    msg = str(e.value)
    assert "nowhere" in msg and "cifar-100-python.tar.gz" in msg and "--dataroot" in msg
    with pytest.raises(DatasetNotFoundError) as e:
        imagenet_datasets(tmp_path, None, None)
    assert "train" in str(e.value) and "--data-root" in str(e.value)


def test_imagenet_folder_and_transforms(synthetic_root):
    train, val = imagenet_datasets(os.path.join(synthetic_root, "imagenet"), imagenet_train_transform(),
                                   imagenet_val_transform())
    assert len(train.classes) == 4 and len(train) == 48 and len(val) == 16
    assert train[0][0].shape == (3, 224, 224) and val[0][0].shape == (3, 224, 224)


def test_loader_knobs(synthetic_root):
    train, _ = cifar_datasets("cifar10", synthetic_root, cifar_test_transform(CIFAR10_MEAN, CIFAR10_STD), None)
    assert len(make_loader(train, 128, drop_last=False)) == 5
    assert len(make_loader(train, 128, drop_last=True)) == 4
    x, y = next(iter(make_loader(train, 16, shuffle=False)))
    assert x.shape == (16, 3, 32, 32) and y.tolist() == train.targets[:16]


def test_class_balanced_sampler_semantics():
    labels = np.repeat(np.arange(100), 500)
    np.random.default_rng(0).shuffle(labels)
    sampler = ClassBalancedSampler(labels, m=2, batch_size=128)
    np.random.seed(0)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 49_920  # 390 full batches
    for b in range(0, 49_920, 128 * 39):
        batch = np.array(indices[b:b + 128])
        cls = labels[batch]
        assert len(set(cls.tolist())) == 64
        assert (cls[0::2] == cls[1::2]).all() and (batch[0::2] != batch[1::2]).all()
    assert len(set(indices)) < 40_000  # images repeat across batches
    # The class order persists: restoring the sampler and NumPy state replays the next epoch exactly.
    state, rng = sampler.state_dict(), np.random.get_state()
    nxt = list(sampler)
    other = ClassBalancedSampler(labels, m=2, batch_size=128)
    other.load_state_dict(state)
    np.random.set_state(rng)
    assert list(other) == nxt
    fresh = ClassBalancedSampler(labels, m=2, batch_size=128)
    np.random.set_state(rng)
    assert list(fresh) != nxt


def test_meter_per_sample_and_per_batch_means_of_topk_accuracy():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    target = torch.tensor([0, 2, 0])
    assert topk_correct(logits, target, (1, 2)).tolist() == [1.0, 2.0]
    assert {k: v.item() for k, v in topk_accuracy(logits, target, (1,), "net/").items()} == \
        {"net/top1": pytest.approx(100 / 3)}
    meter = Meter()
    meter.update({**topk_accuracy(logits[:2], target[:2], (1, 2)), "loss": torch.tensor(1.0)}, 2)  # top-1 1/2
    meter.update({**topk_accuracy(logits[2:], target[2:], (1, 2)), "loss": torch.tensor(4.0)}, 1)  # top-1 0/1
    assert meter.per_sample()["top1"] == pytest.approx(100 / 3)     # weighted by samples: 1 of 3 images
    assert meter.per_batch()["top1"] == pytest.approx(25.0)         # mean over batches: (50 + 0) / 2
    assert meter.per_sample("train/")["train/loss"] == pytest.approx(2.0) and meter.per_batch()["loss"] == 2.5
