"""A small real dataset for a first run without any download: scikit-learn's handwritten digits in CIFAR's format.

    python -m common.digits --out data/digits        # writes data/digits/cifar-10-batches-py/
    cd okddip && python train.py --data-root ../data/digits --num_epochs 5 --schedule 3 4 --run-dir ../runs/digits

scikit-learn ships 1,797 scanned digits (8x8, 17 grey levels, 10 classes); each becomes a 32x32 RGB image (every
pixel repeated 4x4, grey levels scaled to 0..255, the same value in the three channels) in the official CIFAR-10
pickle layout, so every CIFAR-10 script reads it through its real loading code. The split is fixed: the first 300
digits of a seeded shuffle are the test set, the other 1,497 the training set. It is a learning check (does the
pipeline learn a real signal?), not a paper's number; the folder carries a marker so a run on it is never mistaken
for a CIFAR run. Needs scikit-learn (`pip install scikit-learn`).
"""
import argparse
import json
import os
import pickle

import numpy as np

from common.data import CIFAR_ARCHIVES, SYNTHETIC_MARKER

TEST_SIZE = 300
LABELS = [str(d) for d in range(10)]


def digits_images(seed=0):
    """(train images, train labels, test images, test labels): uint8 (N, 32, 32, 3) and int lists."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("common.digits needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)          # (N, 8, 8), 0..255
    images = images.repeat(4, axis=1).repeat(4, axis=2)[..., None].repeat(3, axis=3)  # (N, 32, 32, 3)
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    return images[train], digits.target[train].tolist(), images[test], digits.target[test].tolist()


def _rows(images):
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CHW-flattened rows, as CIFAR stores them


def _dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_digits(root, seed=0):
    """Write ROOT/cifar-10-batches-py/ with the digits; returns that folder."""
    folder = os.path.join(root, CIFAR_ARCHIVES["cifar10"][0])
    os.makedirs(folder, exist_ok=True)
    x_train, y_train, x_test, y_test = digits_images(seed)
    chunks = np.array_split(np.arange(len(y_train)), 5)
    for i, idx in enumerate(chunks, 1):
        _dump({"batch_label": f"training batch {i} of 5", "labels": [y_train[j] for j in idx],
               "data": _rows(x_train[idx]), "filenames": [f"digit_{j}.png" for j in idx]},
              os.path.join(folder, f"data_batch_{i}"))
    _dump({"batch_label": "testing batch 1 of 1", "labels": y_test, "data": _rows(x_test),
           "filenames": [f"digit_test_{j}.png" for j in range(len(y_test))]}, os.path.join(folder, "test_batch"))
    _dump({"num_cases_per_batch": len(chunks[0]), "label_names": LABELS, "num_vis": 3072},
          os.path.join(folder, "batches.meta"))
    with open(os.path.join(folder, SYNTHETIC_MARKER), "w") as f:
        json.dump({"kind": "digits", "source": "sklearn.datasets.load_digits", "seed": seed,
                   "train": len(y_train), "test": len(y_test)}, f)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("data", "digits"), help="folder to write into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    args = parser.parse_args(argv)
    folder = write_digits(args.out, args.seed)
    print(f"scikit-learn digits written in CIFAR-10 format to {folder} (1,497 train, {TEST_SIZE} test images)")


if __name__ == "__main__":
    main()
