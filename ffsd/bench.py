"""FFSD cases for `python -m common.bench`: one real training iteration (the training script's own FFSDRun.train_step)
for every published architecture: the seven CIFAR-100 networks and ImageNet ResNet-18/34.

    python -m common.bench --paper ffsd --device cpu --batch 8 --steps 2 --warmup 1

The step trains all networks of the method (M = 2 students, the leader, the fusion module, both decoders) with the
full lambdas (epoch >= 6) and the script's default options. The deployed network is the leader; its forward also
runs the TransFusion head, which a deployment drops (a few percent of the FLOPs at most).
"""
from functools import partial

import torch
import torch.nn as nn

from common.bench import BenchCase, Built
from common.options import detached_setup
from ffsd.losses import diversity_target
from ffsd.options import get_args_parser
from ffsd.train import INPUT_SIZE, FFSDRun, datasets, loaders
from ffsd.training import build_networks, forward_networks

FULL_LAMBDAS_EPOCH = 6  # after the 5-epoch warm-up: every term at its full weight
CIFAR = ["resnet20", "resnet32", "resnet56", "wideresnet1602", "wideresnet4002", "densenet", "googlenet"]
IMAGENET = ["resnet18", "resnet34"]


class WholeIteration(nn.Module):
    """Every network forward of one iteration, on images: for the FLOP counter and the parameter count."""

    def __init__(self, nets):
        super().__init__()
        self.nets = nets

    def forward(self, x):
        _, leader_maps, _, _, student_maps, _, _, fused = forward_networks(self.nets, x)
        for i, decoder in enumerate(self.nets.sd_students, 1):
            decoder(diversity_target(student_maps[i - 1][-1]))  # targets for follower i
            decoder(student_maps[i][-1])  # its own training forward
        self.nets.sd_leader(fused)
        return self.nets.sd_leader(leader_maps[-1])


def build(fast, batch, model, dataset):
    args = get_args_parser(dataset).parse_args(["--model", model, "--train_batch_size", str(batch)])
    torch.manual_seed(0)
    nets = build_networks(model, dataset, args.model_num, INPUT_SIZE[dataset]).to(fast.device)
    run = FFSDRun(detached_setup(fast), args, nets, train_size=batch)
    run.on_epoch_start(FULL_LAMBDAS_EPOCH)
    return Built(step=partial(run.train_step, 0), deployed=run.prepared.leader, models=[WholeIteration(nets)],
                 input_size=INPUT_SIZE[dataset], num_classes=1000 if dataset == "imagenet" else 100)


def train_loader(data_root, fast, batch, workers, dataset):
    """cifar.py's / imagenet.py's own train loader (the released PIL pipeline with the script's default workers, or
    the device-resident one when the Fast value holds the data on the device)."""
    flags = ["--dataroot", data_root, "--train_batch_size", str(batch)]
    if workers is not None:
        flags += ["--workers", str(workers)]
    args = get_args_parser(dataset).parse_args(flags)
    train_set, test_set = datasets(args)
    return loaders(args, train_set, test_set, detached_setup(fast))[0]


CASES = [BenchCase("ffsd", "FFSD", arch, partial(build, model=arch, dataset="cifar100"),
                   partial(train_loader, dataset="cifar100")) for arch in CIFAR] + \
        [BenchCase("ffsd", "FFSD", f"{arch} (ImageNet)", partial(build, model=arch, dataset="imagenet"),
                   partial(train_loader, dataset="imagenet"), "imagenet") for arch in IMAGENET]
