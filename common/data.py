"""Datasets, transforms and loaders shared by the four papers.

Each paper's transform differs in small ways that change results (padding mode, the order of pad/flip/crop, the
normalisation constants), so everything is a parameter and the defaults are nobody's: callers pass their paper's
values explicitly.
"""
import json
import os

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from torch.utils.data import DataLoader

# Normalisation constants as the authors' code wrote them (the digits differ between repositories).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

CIFAR_ARCHIVES = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}
SYNTHETIC_MARKER = "SYNTHETIC.json"  # written by common.synthetic next to the pickles


class DatasetNotFoundError(FileNotFoundError):
    pass


def cifar_train_transform(mean, std, padding_mode="constant", order="crop_flip"):
    """The CIFAR training augmentation.

    order="crop_flip": RandomCrop(32, padding=4, padding_mode) -> RandomHorizontalFlip (OKDDip, L-MCL).
    order="pad_flip_crop": Pad(4, padding_mode) -> RandomHorizontalFlip -> RandomCrop(32) (DCM, FFSD).
    The two orders draw the crop offsets and the flip from the RNG in a different order, so they are not
    interchangeable for seed-exact runs even though they produce the same distribution of images.
    """
    if order == "crop_flip":
        augment = [T.RandomCrop(32, padding=4, padding_mode=padding_mode), T.RandomHorizontalFlip()]
    elif order == "pad_flip_crop":
        augment = [T.Pad(4, padding_mode=padding_mode), T.RandomHorizontalFlip(), T.RandomCrop(32)]
    else:
        raise ValueError(f"unknown augmentation order {order!r}; valid: 'crop_flip', 'pad_flip_crop'")
    return T.Compose(augment + [T.ToTensor(), T.Normalize(mean, std)])


def cifar_test_transform(mean, std):
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])


def imagenet_train_transform(mean=IMAGENET_MEAN, std=IMAGENET_STD, size=224):
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def imagenet_val_transform(mean=IMAGENET_MEAN, std=IMAGENET_STD, size=224, resize=256):
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


def _cifar_class(name):
    base = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]

    class CIFAR(base):
        # torchvision verifies the md5 of every pickle. Synthetic folders written by common.synthetic carry a marker
        # file and are checked for presence only; real folders keep torchvision's md5 check.
        def _synthetic(self):
            return os.path.exists(os.path.join(self.root, self.base_folder, SYNTHETIC_MARKER))

        def _check_integrity(self):
            if self._synthetic():
                files = [f for f, _ in self.train_list + self.test_list]
                return all(os.path.exists(os.path.join(self.root, self.base_folder, f)) for f in files)
            return super()._check_integrity()

        def _load_meta(self):
            if self._synthetic():
                self.meta = dict(self.meta, md5=None)  # check_integrity(path, None) checks existence only
            super()._load_meta()

    CIFAR.__name__ = base.__name__
    return CIFAR


def normalize_dataset_name(name):
    key = name.lower().replace("-", "")
    if key not in CIFAR_ARCHIVES:
        raise ValueError(f"unknown CIFAR dataset {name!r}; valid: CIFAR10, CIFAR100")
    return key


def cifar_datasets(name, root, train_transform, test_transform, download=False, flag="--data-root"):
    """(train, test) torchvision CIFAR datasets. Without download, a missing folder raises one clear message."""
    key = normalize_dataset_name(name)
    folder, archive, url = CIFAR_ARCHIVES[key]
    root = os.path.expanduser(str(root))
    cls = _cifar_class(key)
    try:
        train = cls(root, train=True, transform=train_transform, download=download)
        test = cls(root, train=False, transform=test_transform, download=False)
    except (RuntimeError, OSError) as e:  # OSError: a download without a network (urllib's URLError)
        if download:
            raise DatasetNotFoundError(
                f"{name} could not be downloaded into {os.path.join(root, folder)} ({e}). Download {url} by hand, "
                f"extract {archive} in {root} so that {os.path.join(root, folder)} exists, or point {flag} elsewhere."
            ) from e
        raise DatasetNotFoundError(
            f"{name} not found (or corrupted) in {os.path.join(os.path.abspath(root), folder)}. Place the extracted "
            f"{archive} ({url}) in {os.path.abspath(root)}, or point {flag} at the folder that contains {folder}/."
        ) from e
    return train, test


def imagenet_datasets(root, train_transform, val_transform, flag="--data-root"):
    """(train, val) ImageFolder datasets from ROOT/train and ROOT/val (one sub-folder per class)."""
    root = os.path.expanduser(str(root))
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DatasetNotFoundError(
                f"ImageNet split '{split}' not found: {os.path.join(os.path.abspath(root), split)} does not exist. "
                f"Place the ILSVRC-2012 images there as one folder per class (train/n01440764/*.JPEG, "
                f"val/n01440764/*.JPEG, ...), or point {flag} at the folder that holds train/ and val/."
            )
    train = torchvision.datasets.ImageFolder(os.path.join(root, "train"), train_transform)
    val = torchvision.datasets.ImageFolder(os.path.join(root, "val"), val_transform)
    return train, val


def make_loader(dataset, batch_size, shuffle=False, drop_last=False, workers=0, pin_memory=False, sampler=None,
                batch_sampler=None, generator=None, persistent_workers=False):
    """A DataLoader with every knob the papers differ on explicit. `batch_sampler` replaces batch_size/shuffle."""
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers and workers > 0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      drop_last=drop_last, num_workers=workers, pin_memory=pin_memory, generator=generator,
                      persistent_workers=persistent_workers and workers > 0)


class ClassBalancedSampler(torch.utils.data.Sampler):
    """L-MCL's class-balanced sampler (pytorch-metric-learning's MPerClassSampler, m = 2 with batch 128).

    Use with DataLoader(batch_size=batch_size, sampler=...). The epoch has length - length % batch_size indices. For
    every batch, the list of class ids (in order of first appearance in `labels`) is shuffled IN PLACE with NumPy's
    global RNG, the first batch_size // m classes are taken, and m distinct images are drawn for each (NumPy choice,
    with replacement only when a class has fewer than m images). The class list stays shuffled from one batch and one
    epoch to the next, so it is state: state_dict()/load_state_dict() carry it, together with NumPy's RNG state.
    """

    def __init__(self, labels, m=2, batch_size=128, length=None):
        labels = np.asarray(labels)
        if batch_size % m:
            raise ValueError(f"batch_size {batch_size} is not a multiple of m = {m}")
        self.m, self.batch_size = m, batch_size
        self.classes = list(dict.fromkeys(labels.tolist()))  # first-appearance order, as the original
        self.indices_of = {c: np.flatnonzero(labels == c) for c in self.classes}
        if batch_size // m > len(self.classes):
            raise ValueError(f"{batch_size // m} classes per batch requested; the dataset has {len(self.classes)}")
        length = len(labels) if length is None else length
        self.length = length - length % batch_size

    def __len__(self):
        return self.length

    def __iter__(self):
        indices = []
        for _ in range(self.length // self.batch_size):
            np.random.shuffle(self.classes)
            for c in self.classes[: self.batch_size // self.m]:
                pool = self.indices_of[c]
                indices.extend(np.random.choice(pool, size=self.m, replace=len(pool) < self.m).tolist())
        return iter(indices)

    def state_dict(self):
        return {"classes": list(self.classes)}

    def load_state_dict(self, state):
        if sorted(state["classes"]) != sorted(self.classes):
            raise ValueError("sampler state belongs to a dataset with other classes")
        self.classes = list(state["classes"])


def data_kind(root):
    """What a data folder holds: the `kind` written by common.synthetic / common.digits next to their data
    ("synthetic", "digits"), else "real". Part of a run's identity, so a run on made-up data is never resumed or
    mistaken for one on the real dataset."""
    if not root:
        return "real"
    kinds = set()
    for folder in [root] + [os.path.join(root, f) for f, _, _ in CIFAR_ARCHIVES.values()]:
        path = os.path.join(folder, SYNTHETIC_MARKER)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    kinds.add(json.load(f).get("kind", "synthetic"))
            except (OSError, ValueError):
                kinds.add("synthetic")
    return "+".join(sorted(kinds)) if kinds else "real"
