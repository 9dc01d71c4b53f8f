"""FFSD on CIFAR-100 (the authors' cifar.py): two common students, a leader with its TransFusion head, the fusion
module and the self-distillation decoders, trained online together.

    python cifar.py --dataroot DATA --model resnet32 --name cifar100_resnet32_div1e-5_sd1000_fusion10
    python -m ffsd.cifar --data-root DATA --run-dir runs/r32 --model resnet32 --seed 1

Options as the authors' options/options.py (see ffsd/README.md); 299 epochs by default (--n_epochs 300 is exclusive).
"""
import functools

from common.cli import run_main
from ffsd.train import main

if __name__ == "__main__":
    run_main(functools.partial(main, dataset="cifar100"))
