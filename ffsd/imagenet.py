"""FFSD on ImageNet with ResNet-18/34 (the authors' imagenet.py / distribute_imagenet.py), on any number of GPUs:

    torchrun --nproc_per_node 8 imagenet.py --dataroot IMAGENET --model resnet18 --name imagenet_resnet18

The recipe is the released one (forced in the authors' trainer, defaults here: ffsd.options.IMAGENET_DEFAULTS): 90
as loop end (89 epochs), global batch 256 kept whatever the process count, the per-iteration SGD lr rule with its
warm-up over epochs 1-4, Adam decoders on MultiStepLR([30, 60, 80]). DDP (common.distributed) replaces the released
nn.DataParallel.
"""
import functools

from common.cli import run_main
from ffsd.train import main

if __name__ == "__main__":
    run_main(functools.partial(main, dataset="imagenet"))
