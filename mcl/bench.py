"""L-MCL cases for `python -m common.bench`: one real training iteration of the four scripts, through their own Runs
(mcl.runs: BaselineRun.train_step, LMCLRun.train_step, MemoryBankRun.train_step).

    python -m common.bench --paper mcl --arch resnet32 --device cpu --batch 8 --steps 2 --warmup 1

One case per network and pair of the published tables (the arch name of a case is the script's --arch without
`lmcl_` and `_cifar`). "L-MCL" times the ordinary iteration (49 of every 50 on CIFAR, 499 of 500 on ImageNet); its
extra step "meta" is the iteration on a meta batch (the ordinary step, then the meta step: three virtual steps and
the second-order hypergradient), reported as a multiple of the ordinary one, so one epoch costs about
(49 + ratio) / 50 ordinary steps per batch. L-MCL batches are class-balanced (2 images per class) as the sampler's.
The deployed network is network 1's backbone; the trained modules are the pair with its auxiliary branches (the embed
heads, aggregator and weight network are a few Linear layers).
"""
from functools import partial

import torch
import torch.nn as nn

from common.bench import BenchCase, Built
from common.options import detached_setup
from mcl import main_cifar_baseline, main_imagenet_baseline, main_layer_mcl_cifar_meta, main_layer_mcl_imagenet_meta
from mcl.memory_bank import ContrastiveIndices
from mcl.models import CIFAR_BASELINES, CIFAR_PAIRS, IMAGENET_BASELINES, IMAGENET_PAIRS, build_cifar_baseline, \
    build_imagenet_baseline, networks_of
from mcl.published import bench_arch as label
from mcl.runs import BaselineRun, LMCLRun, MemoryBankRun
from mcl.train_utils import imagenet_data

IMAGENET_TRAIN_IMAGES = 1_281_167  # one memory slot per training image


class Backbone(nn.Module):
    """The deployed part of an L-MCL network: its backbone, returning the logits."""

    def __init__(self, net):
        super().__init__()
        self.backbone = net.backbone

    def forward(self, x):
        return self.backbone(x)


class Logits(nn.Module):
    """A network returning only its logits (the FLOP counter and the eval timing want one tensor): a baseline's,
    or a pair's network-1 final head (all of the pair runs, auxiliary branches included)."""

    def __init__(self, model, pair=False):
        super().__init__()
        self.model, self.pair = model, pair

    def forward(self, x):
        logits = self.model(x)[1]
        return logits[0][-1] if self.pair else logits


def script_args(script, batch, extra=()):
    """The script's defaults (kd_T, tau, coefficients, times, lr rule) at this batch size."""
    return script.get_args_parser().parse_args(["--batch-size", str(batch), *extra])


def build_baseline(fast, batch, arch, imagenet=False):
    torch.manual_seed(0)
    script = main_imagenet_baseline if imagenet else main_cifar_baseline
    args = script_args(script, batch, ["--arch", arch])
    model = (build_imagenet_baseline(arch) if imagenet else build_cifar_baseline(arch, 100)).to(fast.device)
    run = BaselineRun(detached_setup(fast), args, model, None, nesterov=not imagenet)
    run.on_epoch_start(0)
    return Built(step=partial(run.train_step, 1), deployed=Logits(run.forward_model), models=[Logits(model)],
                 input_size=224 if imagenet else 32, num_classes=1000 if imagenet else 100)


def balanced(y, classes):
    return torch.arange(y.size(0), device=y.device) // 2 % classes  # the sampler's batches: 2 images per class


def build_lmcl(fast, batch, arch):
    torch.manual_seed(0)
    args = script_args(main_layer_mcl_cifar_meta, batch, ["--arch", arch])
    modules, _ = main_layer_mcl_cifar_meta.build_modules(args, fast.device)
    run = LMCLRun(detached_setup(fast), args, modules)
    run.on_epoch_start(0)

    def iteration(step, x, y):
        return run.train_step(step, x, balanced(y, 100))

    return Built(step=partial(iteration, 1), deployed=Backbone(networks_of(run.pair)[0]),
                 models=[Logits(run.pair, pair=True)], extra_steps={"meta": partial(iteration, 0)})


def build_imagenet_lmcl(fast, batch, arch):
    torch.manual_seed(0)
    args = script_args(main_layer_mcl_imagenet_meta, batch, ["--arch", arch])
    modules, memory = main_layer_mcl_imagenet_meta.build_modules(args, fast.device, 1000, IMAGENET_TRAIN_IMAGES)
    run = MemoryBankRun(detached_setup(fast), args, modules, memory)
    run.on_epoch_start(0)
    rows = torch.randint(0, IMAGENET_TRAIN_IMAGES, (batch, 1 + args.pos_k + args.neg_k), device=fast.device)

    def iteration(step, x, y):  # the loader's targets: label, then the contrast index row
        return run.train_step(step, x, torch.cat([balanced(y, 1000).view(-1, 1), rows[: x.size(0)]], 1))

    return Built(step=partial(iteration, 1), deployed=Backbone(networks_of(run.pair)[0]),
                 models=[Logits(run.pair, pair=True)], input_size=224, num_classes=1000,
                 extra_steps={"meta": partial(iteration, 0)})


def cifar_train_loader(data_root, fast, batch, workers, script):
    """The script's own train loader: shuffled for the baseline, the class-balanced sampler for L-MCL (the authors'
    PIL pipeline with --num-workers processes, or the device-resident loader)."""
    flags = ["--data-root", data_root] + (["--num-workers", str(workers)] if workers is not None else [])
    return script.cifar_loaders(script_args(script, batch, flags), fast)[0]


def imagenet_train_loader(data_root, fast, batch, workers, script, contrast=False):
    """The script's own ImageNet train loader (one process), with the contrast index rows for L-MCL."""
    flags = ["--data-root", data_root] + (["--num-workers", str(workers)] if workers is not None else [])
    args = script_args(script, batch, flags)
    wrap = (lambda ds: ContrastiveIndices(ds, args.pos_k, args.neg_k)) if contrast else None
    return imagenet_data(args, detached_setup(fast).ctx, wrap_train=wrap)[1]


CASES = [BenchCase("mcl", "baseline", label(arch), partial(build_baseline, arch=arch),
                   partial(cifar_train_loader, script=main_cifar_baseline)) for arch in CIFAR_BASELINES]
CASES += [BenchCase("mcl", "L-MCL", label(arch), partial(build_lmcl, arch=arch),
                    partial(cifar_train_loader, script=main_layer_mcl_cifar_meta)) for arch in CIFAR_PAIRS]
CASES += [BenchCase("mcl", "baseline", label(arch), partial(build_baseline, arch=arch, imagenet=True),
                    partial(imagenet_train_loader, script=main_imagenet_baseline), dataset="imagenet")
          for arch in IMAGENET_BASELINES]
CASES += [BenchCase("mcl", "L-MCL", label(arch), partial(build_imagenet_lmcl, arch=arch),
                    partial(imagenet_train_loader, script=main_layer_mcl_imagenet_meta, contrast=True),
                    dataset="imagenet") for arch in IMAGENET_PAIRS]
