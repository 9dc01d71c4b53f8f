"""L-MCL cases for `python -m common.bench`: one real training iteration of the CIFAR-100 scripts, through the same
functions they call (mcl.train_utils.baseline_step; mcl.lmcl.train_step and MetaStep.step).

    python -m common.bench --paper mcl --device cpu --batch 8 --steps 2 --warmup 1

Cases: the baseline (one network, CE) and L-MCL for ResNet-32 and the heterogeneous ResNet-32/ResNet-110 pair.
"L-MCL" is the ordinary step alone (49 of every 50 iterations); "L-MCL+meta" runs the meta step (three virtual
steps and the second-order hypergradient) after the ordinary step at every timed iteration, so one epoch's cost is
about (49 x L-MCL + 1 x L-MCL+meta) / 50 per batch. The batch is class-balanced (2 images per class) as the sampler's.
The deployed network is network 1's backbone; the trained modules are the pair with its auxiliary branches (the embed
heads, aggregator and weight network are a few Linear layers).
"""
from functools import partial

import torch
import torch.nn as nn

from common.bench import BenchCase, Built
from common.fast import autocast, prepare_model
from mcl import main_cifar_baseline, main_layer_mcl_cifar_meta
from mcl.lmcl import MetaStep, make_optimizers, train_step
from mcl.main_layer_mcl_cifar_meta import build_modules, get_parser
from mcl.models import build_cifar_baseline, networks_of
from mcl.train_utils import baseline_step

LR, WEIGHT_DECAY = 0.1, 5e-4


class Backbone(nn.Module):
    """The deployed part of an L-MCL network: its backbone, returning the logits."""

    def __init__(self, net):
        super().__init__()
        self.backbone = net.backbone

    def forward(self, x):
        return self.backbone(x)


class Logits(nn.Module):
    """A baseline network returning only its logits (the FLOP counter and the eval timing want one tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[1]


def build_baseline(device, args, arch):
    torch.manual_seed(0)
    model = build_cifar_baseline(arch, 100).to(device)
    forward = prepare_model(model, args)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY)
    model.train()

    def step(x, y):
        baseline_step(forward, optimizer, x, y, autocast=lambda: autocast(args, device))

    return Built(step=step, deployed=Logits(forward), models=[Logits(model)])


def build_lmcl(device, args, arch, meta):
    torch.manual_seed(0)
    opts = get_parser().parse_args(["--arch", arch])  # the script's defaults (kd_T, tau, coefficients, times)
    pair, embed_heads, aggregator, weight_net = build_modules(opts, device)
    forward_pair = prepare_model(pair, args)
    optimizer, weight_optimizer = make_optimizers(pair, embed_heads, aggregator, weight_net, opts)
    meta_step = MetaStep(pair, embed_heads, weight_net, opts)
    pair.train(), embed_heads.train(), aggregator.train()

    def step(x, y):
        y = torch.arange(x.size(0), device=y.device) // 2 % 100  # the sampler's batches: 2 images per class
        train_step(forward_pair, embed_heads, aggregator, weight_net, optimizer, x, y, opts,
                   autocast=lambda: autocast(args, device))
        if meta:
            meta_step.step(x, y, opts.init_lr, weight_optimizer)

    deployed = Backbone(networks_of(pair)[0])
    return Built(step=step, deployed=deployed, models=[PairForFlops(pair)])


class PairForFlops(nn.Module):
    """The whole pair (both networks, auxiliary branches included) on an image batch."""

    def __init__(self, pair):
        super().__init__()
        self.pair = pair

    def forward(self, x):
        return self.pair(x)[1][0][-1]


def train_loader(data_root, device, bench_args, script):
    """The script's own train loader: shuffled for the baseline, the class-balanced sampler for L-MCL (the authors'
    PIL pipeline with --num-workers processes, or the device-resident loader)."""
    flags = ["--data-root", data_root, "--batch-size", str(bench_args.batch)]
    if bench_args.workers is not None:
        flags += ["--num-workers", str(bench_args.workers)]
    args = script.get_parser().parse_args(flags)
    for name in ("data_on_device", "channels_last"):
        setattr(args, name, getattr(bench_args, name))
    return script.cifar_loaders(args, device)[0]


# the baselines of the two pairs' networks, then L-MCL without and with the meta step for each pair
CASES = [BenchCase("mcl", "baseline", arch, partial(build_baseline, arch=f"{arch}_cifar"),
                   partial(train_loader, script=main_cifar_baseline)) for arch in ("resnet32", "resnet110")]
for name, pair_arch in (("resnet32", "lmcl_resnet32_cifar"), ("res32_res110", "lmcl_res32_res110_cifar")):
    lmcl_loader = partial(train_loader, script=main_layer_mcl_cifar_meta)
    CASES += [BenchCase("mcl", "L-MCL", name, partial(build_lmcl, arch=pair_arch, meta=False), lmcl_loader),
              BenchCase("mcl", "L-MCL+meta", name, partial(build_lmcl, arch=pair_arch, meta=True), lmcl_loader)]
