"""FFSD cases for `python -m common.bench`: one real training iteration (ffsd.training.train_step, the function the
training scripts call) for every published architecture: the seven CIFAR-100 networks and ImageNet ResNet-18/34.

    python -m common.bench --paper ffsd --device cpu --batch 8 --steps 2 --warmup 1

The step trains all networks of the method (M = 2 students, the leader, the fusion module, both decoders) with the
full lambdas (epoch >= 6). The deployed network is the leader; its forward also runs the TransFusion head, which a
deployment drops (a few percent of the FLOPs at most).
"""
from functools import partial

import torch
import torch.nn as nn

from common.bench import BenchCase, Built
from common.distributed import init_distributed
from common.fast import autocast
from ffsd.options import parse

from ffsd.losses import diversity_target
from ffsd.training import build_networks, build_optimizers, forward_networks, prepare_networks, train_step, \
    warmed_up_lambdas
from ffsd.train import make_loaders

LAMBDAS = {"diversity": 1e-5, "fusion": 10.0, "self_distillation": 1000.0}
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


def build(device, args, model, dataset):
    torch.manual_seed(0)
    probe = 224 if dataset == "imagenet" else 32
    nets = build_networks(model, dataset, probe_size=probe).to(device)
    forward = prepare_networks(nets, args)
    optimizers = build_optimizers(nets)
    lambdas = warmed_up_lambdas(LAMBDAS, 6)
    nets.train()

    def step(x, y):
        train_step(nets, optimizers, x, y, lambdas, forward=forward, autocast=lambda: autocast(args, device))

    return Built(step=step, deployed=forward.leader, models=[WholeIteration(nets)], input_size=probe,
                 num_classes=1000 if dataset == "imagenet" else 100)


def train_loader(data_root, device, bench_args, model, dataset):
    """cifar.py's / imagenet.py's own train loader (released: 8 workers; or the device-resident one)."""
    flags = ["--model", model, "--dataroot", data_root, "--train_batch_size", str(bench_args.batch)]
    if bench_args.workers is not None:
        flags += ["--workers", str(bench_args.workers)]
    args = parse(flags, dataset)
    for name in ("data_on_device", "channels_last"):
        setattr(args, name, getattr(bench_args, name))
    return make_loaders(args, init_distributed(device), device)[0]


CASES = [BenchCase("ffsd", "FFSD", arch, partial(build, model=arch, dataset="cifar100"),
                   partial(train_loader, model=arch, dataset="cifar100")) for arch in CIFAR] + \
        [BenchCase("ffsd", "FFSD", f"{arch} (ImageNet)", partial(build, model=arch, dataset="imagenet"),
                   partial(train_loader, model=arch, dataset="imagenet"), "imagenet") for arch in IMAGENET]
