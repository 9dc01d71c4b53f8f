"""What the four L-MCL scripts share: the base parser (the authors' flags, their per-script defaults), the lr rule,
head names, the evaluation (one function on common.loop.evaluate), the seeded start-up draws of the CIFAR scripts and
the data plumbing of the two ImageNet scripts (torchrun)."""
import argparse
import math
import os

import torch
import torch.nn.functional as F

from common.fast import add_fast_args, at_least_fp32
from common.loop import evaluate
from common.meters import topk_accuracy
from common.options import add_run_args, check_positive, loader_workers

# The authors' CIFAR-100 normalisation (its digits differ from common.data's CIFAR100_MEAN/STD)
LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)

# The authors' defaults where their four scripts differ (CIFAR / ImageNet); everything else is shared
CIFAR_DEFAULTS = dict(dataset="cifar100", weight_decay=5e-4, lr_type="cosine", milestones=[150, 225], epochs=300,
                      batch_size=128, num_workers=8)
IMAGENET_DEFAULTS = dict(dataset="imagenet", weight_decay=1e-4, lr_type="multistep", milestones=[30, 60, 90],
                         epochs=100, batch_size=256, num_workers=16)


def base_parser(description, archs, arch, defaults):
    """The flags every L-MCL script has, with the authors' names; DEFAULTS: CIFAR_DEFAULTS or IMAGENET_DEFAULTS.
    The script adds its own flags, then `finish_parser`."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=defaults["dataset"], choices=[defaults["dataset"]],
                   help=f"names the run folder; the authors' script trains on {defaults['dataset']} only")
    p.add_argument("--arch", default=arch, help="one of: " + ", ".join(archs))
    p.add_argument("--init-lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=defaults["weight_decay"],
                   help="on every parameter, every optimizer")
    p.add_argument("--lr-type", default=defaults["lr_type"], choices=["cosine", "multistep"])
    p.add_argument("--milestones", type=int, nargs="+", default=defaults["milestones"])
    p.add_argument("--epochs", type=int, default=defaults["epochs"])
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    p.add_argument("--num-workers", type=int, default=loader_workers(defaults["num_workers"]),
                   help=f"loader processes (the authors': {defaults['num_workers']}; never more than the cores)")
    p.add_argument("--gpu-id", default="0", help="accepted for compatibility; use --device")
    p.add_argument("--manual_seed", "--seed", dest="manual_seed", type=int, default=0)
    p.add_argument("--evaluate", "-e", action="store_true", help="only test --evaluate-checkpoint")
    p.add_argument("--evaluate-checkpoint", default=None, help="default: <run-dir>/best.pt")
    p.add_argument("--checkpoint-dir", default="./checkpoint", help="parent of the default run folder")
    return p


def finish_parser(p):
    add_run_args(p, data_root_aliases=("--data",))
    add_fast_args(p)
    return p


# options that never change what is trained (they may differ when a run is resumed)
# options that change no value (--meta-recompute: the meta step's memory against its time) may change on resume
MAY_CHANGE = ("gpu_id", "evaluate", "evaluate_checkpoint", "checkpoint_dir", "meta_recompute")


def check_args(parser, args, archs, positive=()):
    """parser.error for an unknown --arch or a non-positive value among the common flags and POSITIVE."""
    if args.arch not in archs:
        parser.error(f"unknown --arch {args.arch!r}; valid: {', '.join(archs)}")
    check_positive(parser, args, ["epochs", "batch_size", "init_lr", *positive])
    check_positive(parser, args, ["weight_decay", "num_workers"], allow_zero=("weight_decay", "num_workers"))


def run_folder(args, name):
    """The authors' run folder name under --checkpoint-dir (used when --run-dir is not given)."""
    return os.path.join(args.checkpoint_dir, name)


def build_as_released(make_model, probe_shape):
    """MAKE_MODEL() drawn from the seeded RNG as the authors' CIFAR scripts draw it: built once for their parameter /
    FLOP log line and discarded, built again (the model that is trained), then their torch.randn width probe of
    PROBE_SHAPE, on the CPU. Returns (model, probe); every later seeded draw (loss-side modules, augmentation) is then
    the authors' too (tests/test_mcl.py checks the shipped fixture's weights bit for bit)."""
    make_model()
    model = make_model()
    return model, torch.randn(probe_shape)


def lr_at_epoch(args, epoch):
    """adjust_lr of the authors: epoch-wise cosine from init_lr, or x0.1 at every milestone; other types give 0."""
    if args.lr_type == "cosine":
        return args.init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    if args.lr_type == "multistep":
        return args.init_lr * 0.1 ** sum(epoch >= m for m in args.milestones)
    return 0.0


def set_lr(optimizers, lr):
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def head_names(number_net, number_stage):
    """Log names of every head: net1/aux1, net1/aux2, ..., net1 (the deployed head), net2/aux1, ..."""
    return [[f"net{i + 1}/aux{j + 1}" if j < number_stage - 1 else f"net{i + 1}" for j in range(number_stage)]
            for i in range(number_net)]


def test_heads(model, loader, setup, single=False):
    """Eval-mode test of every head over the (per-process part of the) test loader, summed over processes:
    per-head CE and top-1/top-5 (percent), and for a pair the authors' test loss (the sum of the head CEs) and per
    network the maximum top-1 over its heads (what the released logs report). SINGLE: a baseline network (`net`)."""
    model.eval()

    def forward(x, y):
        logits = model(x)[1]
        heads = [[logits]] if single else logits
        names = [["net"]] if single else head_names(len(heads), len(heads[0]))
        losses = [[F.cross_entropy(at_least_fp32(z), y) for z in net] for net in heads]
        values = {} if single else {"loss": sum(sum(row) for row in losses)}
        for row, net, net_losses in zip(names, heads, losses):
            for name, z, ce in zip(row, net, net_losses):
                values.update({f"{name}/loss": ce, **topk_accuracy(z, y, (1, 5), f"{name}/")})
        return values

    record = evaluate(forward, loader, setup).per_sample("test/")
    if not single:
        nets = sorted({k.split("/")[1] for k in record if k.startswith("test/net")})
        for net in nets:
            record[f"test/{net}/max_heads/top1"] = max(v for k, v in record.items() if k.endswith("/top1")
                                                       and k.split("/")[1] == net)
        record["test/max_heads/top1"] = max(record[f"test/{net}/max_heads/top1"] for net in nets)
    return record


# ---- ImageNet scripts (torchrun / DDP; also one plain process) ----

def add_imagenet_args(p):
    """Options both ImageNet scripts share beyond the authors' (launcher flags are accepted and ignored)."""
    p.add_argument("--image-size", type=int, default=224,
                   help="train crop and val centre crop (val resize = size * 256/224); smaller only for smoke runs")
    for flag in ("--world-size", "--rank", "--dist-url", "--dist-backend", "--local_rank", "--local-rank",
                 "--master_addr", "--master_port"):
        p.add_argument(flag, default=None, help="accepted for compatibility; torchrun's environment is used")
    p.add_argument("--multiprocessing-distributed", action="store_true",
                   help="accepted for compatibility; launch with torchrun --nproc_per_node N instead")


IMAGENET_MAY_CHANGE = MAY_CHANGE + ("world_size", "rank", "dist_url", "dist_backend", "local_rank", "master_addr",
                                    "master_port", "multiprocessing_distributed")


def check_imagenet_args(parser, args, archs, positive=()):
    check_args(parser, args, archs, ("image_size", *positive))
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; known before the process group starts
    if args.batch_size % processes:
        parser.error(f"--batch-size {args.batch_size} (global) is not divisible by {processes} processes")


def imagenet_data(args, ctx, wrap_train=None):
    """Train/val ImageFolders and loaders. The train loader gets this process's share of the published global
    batch (DistributedSampler; common.loop.fit calls its set_epoch); the val set is split into disjoint strided parts
    (exact: no sample is repeated, the sums are all-reduced). --image-size shrinks the crops for smoke runs."""
    from torch.utils.data import Subset

    from common.data import imagenet_datasets, imagenet_train_transform, imagenet_val_transform, make_loader
    from common.distributed import per_process_batch, train_sampler
    resize = round(args.image_size * 256 / 224)
    train_set, val_set = imagenet_datasets(args.data_root, imagenet_train_transform(size=args.image_size),
                                           imagenet_val_transform(size=args.image_size, resize=resize))
    train_data = wrap_train(train_set) if wrap_train else train_set
    batch = per_process_batch(args.batch_size, ctx)
    sampler = train_sampler(train_data, ctx, shuffle=True, seed=args.manual_seed)
    pin = ctx.device.type == "cuda"
    train_loader = make_loader(train_data, batch, shuffle=sampler is None, sampler=sampler, workers=args.num_workers,
                               pin_memory=pin)
    val_part = Subset(val_set, range(ctx.rank, len(val_set), ctx.world_size))
    val_loader = make_loader(val_part, batch, workers=args.num_workers, pin_memory=pin)
    return train_set, train_loader, val_loader


def seed_epoch(seed, rank, epoch):
    """Data randomness (crops, flips, contrast indices) as a function of (seed, process, epoch): every process
    draws its own, and a resumed run redraws exactly what it would have drawn."""
    import numpy as np
    value = (seed * 1_000_003 + epoch * 1009 + rank) % 2**31
    torch.manual_seed(value)
    np.random.seed(value)


def sync_buffers(module, ctx):
    """Rank 0's BatchNorm statistics everywhere (DDP broadcasts them at every forward; forwards outside DDP, such
    as the meta step's pass at theta_0, leave each process its own)."""
    if ctx.distributed:
        for b in module.buffers():
            torch.distributed.broadcast(b, 0)
