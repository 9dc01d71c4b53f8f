"""FFSD on ImageNet with ResNet-18/34 (the authors' imagenet.py / distribute_imagenet.py), on any number of GPUs:

    torchrun --nproc_per_node 8 imagenet.py --dataroot IMAGENET --model resnet18 --name imagenet_resnet18

The recipe is the released one (forced in the authors' trainer): 90 as loop end (89 epochs), global batch 256 kept
whatever the process count, the per-iteration SGD lr rule with its warm-up over epochs 1-4, Adam decoders on
MultiStepLR([30, 60, 80]). DDP (common.distributed) replaces the released nn.DataParallel.
"""
from ffsd.train import main

IMAGENET_DEFAULTS = ["--n_epochs", "90", "--lr_decay_iters", "30", "60", "80", "--train_batch_size", "256",
                     "--test_batch_size", "256", "--model", "resnet18"]

if __name__ == "__main__":
    import sys
    # The released trainer forced these values; here they are defaults that the command line can still override.
    main(IMAGENET_DEFAULTS + sys.argv[1:], dataset="imagenet", script="ffsd/imagenet.py")
