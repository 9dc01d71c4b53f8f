"""Synthetic data in the REAL on-disk formats, so tests and smoke runs go through the same loading code as real runs.

CIFAR: `cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta) and `cifar-100-python/` (train, test,
meta), pickled dicts exactly as the official archives hold them. ImageNet: an ImageFolder tree `train/<wnid>/*.JPEG`,
`val/<wnid>/*.JPEG`. Every class has its own colour layout plus noise, so a network can learn it in a few dozen steps.

    python -m common.synthetic --out data/synthetic   # writes all three
"""
import argparse
import json
import os
import pickle

import numpy as np

from common.data import CIFAR_ARCHIVES, SYNTHETIC_MARKER


def _class_images(rng, num_classes, per_class, size, noise=40.0):
    """uint8 images (N, size, size, 3) and labels: a 4x4 grid of class-specific colours, upsampled, plus noise."""
    templates = rng.integers(0, 256, size=(num_classes, 4, 4, 3)).astype(np.float32)
    templates = templates.repeat(size // 4, axis=1).repeat(size // 4, axis=2)
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    images = templates[labels] + rng.normal(0.0, noise, size=(len(labels), size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _to_cifar_rows(images):
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CHW-flattened rows, as the archives store them


def _dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(root, name="cifar100", train_per_class=None, test_per_class=None, seed=0):
    """Write a synthetic CIFAR-10 or CIFAR-100 folder under ROOT in the official pickle layout. Returns its path."""
    name = name.lower().replace("-", "")
    folder = os.path.join(root, CIFAR_ARCHIVES[name][0])
    os.makedirs(folder, exist_ok=True)
    num_classes = 10 if name == "cifar10" else 100
    train_per_class = train_per_class or (60 if name == "cifar10" else 6)
    test_per_class = test_per_class or (20 if name == "cifar10" else 2)
    rng = np.random.default_rng(seed)
    x_train, y_train = _class_images(rng, num_classes, train_per_class, 32)
    x_test_all, y_test = _class_images(np.random.default_rng(seed), num_classes, test_per_class, 32)
    # Test images share the train templates (same seed) but get fresh noise.
    x_test = np.clip(x_test_all.astype(np.float32) + rng.normal(0, 10, x_test_all.shape), 0, 255).astype(np.uint8)

    if name == "cifar10":
        label_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        chunks = np.array_split(np.arange(len(y_train)), 5)
        for i, idx in enumerate(chunks, 1):
            _dump({"batch_label": f"training batch {i} of 5", "labels": y_train[idx].tolist(),
                   "data": _to_cifar_rows(x_train[idx]), "filenames": [f"synthetic_{j}.png" for j in idx]},
                  os.path.join(folder, f"data_batch_{i}"))
        _dump({"batch_label": "testing batch 1 of 1", "labels": y_test.tolist(), "data": _to_cifar_rows(x_test),
               "filenames": [f"synthetic_test_{j}.png" for j in range(len(y_test))]}, os.path.join(folder, "test_batch"))
        _dump({"num_cases_per_batch": len(chunks[0]), "label_names": label_names, "num_vis": 3072},
              os.path.join(folder, "batches.meta"))
    else:
        fine = [f"class_{c:02d}" for c in range(100)]
        coarse = [f"superclass_{c:02d}" for c in range(20)]
        for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            _dump({"filenames": [f"synthetic_{split}_{j}.png" for j in range(len(y))], "batch_label": f"{split} batch",
                   "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist(), "data": _to_cifar_rows(x)},
                  os.path.join(folder, split))
        _dump({"fine_label_names": fine, "coarse_label_names": coarse}, os.path.join(folder, "meta"))
    with open(os.path.join(folder, SYNTHETIC_MARKER), "w") as f:
        json.dump({"kind": "synthetic", "synthetic": True, "seed": seed, "num_classes": num_classes, "train": int(len(y_train)),
                   "test": int(len(y_test))}, f)
    return folder


def write_imagefolder(root, num_classes=4, train_per_class=12, val_per_class=4, size=64, seed=0):
    """Write a small ImageNet-style tree ROOT/{train,val}/<wnid>/*.JPEG. Returns ROOT."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    wnids = [f"n{10000000 + 1111 * c:08d}" for c in range(num_classes)]
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        images, labels = _class_images(np.random.default_rng(seed), num_classes, per_class, size)
        images = np.clip(images + rng.normal(0, 8, images.shape), 0, 255).astype(np.uint8)
        for j, (img, y) in enumerate(zip(images, labels)):
            d = os.path.join(root, split, wnids[y])
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{wnids[y]}_{j}.JPEG"), quality=95)
    with open(os.path.join(root, SYNTHETIC_MARKER), "w") as f:
        json.dump({"kind": "synthetic", "seed": seed, "num_classes": num_classes}, f)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic", help="folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_cifar(args.out, "cifar10", seed=args.seed)
    write_cifar(args.out, "cifar100", seed=args.seed)
    write_imagefolder(os.path.join(args.out, "imagenet"), seed=args.seed)
    print(f"synthetic CIFAR-10, CIFAR-100 and ImageFolder written to {args.out}")


if __name__ == "__main__":
    main()
