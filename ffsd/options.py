"""The authors' options (`options/options.py`, program name FFSD), plus this repository's run and fast-path options.

One parser for both entry scripts: `get_args_parser("cifar100")` (cifar.py) and `get_args_parser("imagenet")`
(imagenet.py, whose defaults are the values the released ImageNet trainer forced). Visdom/HTML display options are
accepted and ignored (log.jsonl and tensorboardX events replace them).
"""
import argparse
import os

import torch

from common.fast import add_fast_args
from common.options import add_run_args, check_positive, loader_workers

from ffsd.models import MODELS

# The released ImageNet trainer overwrote these after parsing; here they are defaults the command line can change.
IMAGENET_DEFAULTS = {"n_epochs": 90, "lr_decay_iters": [30, 60, 80], "train_batch_size": 256, "test_batch_size": 256,
                     "model": "resnet18"}
DISPLAY_OPTIONS = (("--display_freq", int, 400), ("--display_ncols", int, 4), ("--display_id", int, 1),
                   ("--display_server", str, "http://localhost"), ("--display_env", str, "main"),
                   ("--display_port", int, 8097), ("--update_html_freq", int, 1000), ("--print_freq", int, 100),
                   ("--display_winsize", int, 256))
# Options that may differ when a run is resumed: where the run lives, the device, what is printed or written besides
# the training state. Everything else is the run's identity (common.options).
MAY_CHANGE = ("gpu_ids", "checkpoints_dir", "name", "phase", "load_path", "print_every", "save_epoch_checkpoints",
              "no_html") + tuple(flag[2:] for flag, _, _ in DISPLAY_OPTIONS)


def get_args_parser(dataset="cifar100", any_dataset=False):
    """The options of cifar.py / imagenet.py (DATASET); ANY_DATASET: test.py, which evaluates either."""
    p = argparse.ArgumentParser(prog="FFSD", description="Feature Fusion and Self-Distillation (online KD)")
    # --dataroot is the authors' name of --data-root (common option); it is not required here.
    p.add_argument("--dataset", default=dataset, choices=list(MODELS) if any_dataset else [dataset],
                   help="dataset (this script: %(default)s)")
    p.add_argument("--name", default="default", help="experiment folder name under --checkpoints_dir")
    p.add_argument("--gpu_ids", default="0", help="comma-separated GPU ids, -1 for CPU; the first is used unless "
                                                  "--device is given")
    p.add_argument("--checkpoints_dir", default="./experiments", help="outputs go to <checkpoints_dir>/<name> "
                   "unless --run-dir is given")
    p.add_argument("--phase", default="train", help="unused (as released)")
    p.add_argument("--load_path", default=None, help="test.py: the leader checkpoint to evaluate")
    p.add_argument("--model", default="resnet32", help="architecture: " + ", ".join(
        name for names in (MODELS.values() if any_dataset else [MODELS[dataset]]) for name in names))
    p.add_argument("--train_batch_size", type=int, default=128, help="global batch (split over torchrun processes)")
    p.add_argument("--test_batch_size", type=int, default=128)
    for flag, kind, default in DISPLAY_OPTIONS:
        p.add_argument(flag, type=kind, default=default, help="accepted and ignored (visdom/HTML display)")
    p.add_argument("--no_html", action="store_true", help="accepted and ignored")
    p.add_argument("--continue_train", dest="resume", action="store_true",
                   help="resume the run in the run folder from its checkpoint.pt (same as --resume)")
    p.add_argument("--start_epoch", type=int, default=1, help="first epoch of the loop (sets the lambda warm-up)")
    p.add_argument("--n_epochs", type=int, default=300,
                   help="loop end, exclusive as released: %(default)s gives one epoch fewer (see --inclusive_epochs)")
    p.add_argument("--lr", type=float, default=0.1, help="initial lr of every SGD optimizer")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight_decay", type=float, default=1e-4, help="students, leader and decoders (fusion: 1e-5)")
    p.add_argument("--lr_policy", default="step", choices=["step", "cosine"],
                   help="step: MultiStepLR(lr_decay_iters, lr_decay_gamma); cosine: CosineAnnealingLR(n_epochs). "
                        "(The released 'linear' and 'plateau' crash.)")
    p.add_argument("--lr_decay_iters", type=int, nargs="+", default=[150, 225], help="milestones in epochs")
    p.add_argument("--lr_decay_gamma", type=float, default=0.1)
    p.add_argument("--model_num", type=int, default=2, help="number of common students M (>= 2)")
    p.add_argument("--temperature", type=float, default=2, help="KD temperature T")
    p.add_argument("--lambda_diversity", type=float, default=1e-5)
    p.add_argument("--lambda_fusion", type=float, default=10.0)
    p.add_argument("--lambda_self_distillation", type=float, default=1000.0)

    g = p.add_argument_group("additions of this repository (defaults keep the released behaviour)")
    g.add_argument("--seed", type=int, default=0, help="seeds torch, NumPy and random (the released code set none)")
    g.add_argument("--workers", type=int, default=loader_workers(8),
                   help="data loader workers (released: 8; never more than this machine's cores)")
    g.add_argument("--follower_sd_weight", default="diversity", choices=["diversity", "self_distillation"],
                   help="lambda weighing the follower students' self-distillation term: 'diversity' as released "
                        "(1e-5, numerically dead), or 'self_distillation' (the evident intent)")
    g.add_argument("--normalized_diversity_target", action="store_true",
                   help="divide the attention-shifting target by its raw norm so it is on the scale of the "
                        "normalised attention it is compared with (released: raw scale, loss ~1e2)")
    g.add_argument("--inclusive_epochs", action="store_true",
                   help="run epochs start_epoch..n_epochs inclusive (released: n_epochs exclusive, 299 on CIFAR, 89 on "
                        "ImageNet); the ImageNet lr warm-up is --imagenet_warmup's")
    g.add_argument("--imagenet_warmup", default="released", choices=["released", "five_epochs"],
                   help="ImageNet SGD lr warm-up: 'released' counts epochs from 1 in a rule written for epochs from 0, "
                        "so it ramps over epochs 1-4 from about 0.2x; 'five_epochs' ramps over epochs 1-5 from 0. "
                        "Its length is len(train set) // --train_batch_size iterations per epoch (released: // 256, "
                        "the batch its trainer forced)")
    g.add_argument("--fast_forward_schedulers", action="store_true",
                   help="with --start_epoch > 1, step the schedulers to that epoch (released: they start at lr)")
    g.add_argument("--save_epoch_checkpoints", action="store_true",
                   help="also write model<i>_<epoch>.pth every epoch, as released (GBs for GoogLeNet)")
    g.add_argument("--print_every", type=int, default=0,
                   help="console print period in batches (0: the released len(train set) // batch // 10)")
    add_run_args(p, data_root_aliases=("--dataroot",))
    add_fast_args(p)
    p.set_defaults(device=None)  # None: the authors' --gpu_ids decide (device_of)
    if dataset == "imagenet":
        p.set_defaults(**IMAGENET_DEFAULTS)
    return p


def epoch_range(args):
    """The training epochs, 1-based: range(start_epoch, n_epochs) as released (299 on CIFAR), or up to n_epochs
    inclusive with --inclusive_epochs."""
    return range(args.start_epoch, args.n_epochs + 1 if args.inclusive_epochs else args.n_epochs)


def check_args(parser, args):
    """parser.error for every value the scripts cannot honour (before anything is read or written)."""
    if args.model not in MODELS[args.dataset]:
        parser.error(f"unknown --model {args.model!r} for {args.dataset}; valid: {', '.join(MODELS[args.dataset])}")
    if args.model_num < 2:
        parser.error(f"--model_num must be at least 2 (the students distil from each other; the released code "
                     f"divides by model_num - 1); got {args.model_num}")
    check_positive(parser, args, ["temperature", "lr", "lr_decay_gamma", "train_batch_size", "test_batch_size",
                                  "start_epoch"])
    check_positive(parser, args, ["momentum", "weight_decay", "lambda_diversity", "lambda_fusion",
                                  "lambda_self_distillation", "lr_decay_iters", "workers", "print_every"],
                   allow_zero=("momentum", "weight_decay", "lambda_diversity", "lambda_fusion",
                               "lambda_self_distillation", "lr_decay_iters", "workers", "print_every"))
    if not epoch_range(args):
        parser.error(f"--start_epoch {args.start_epoch} and --n_epochs {args.n_epochs} leave no epoch to train "
                     f"(the loop is range(start_epoch, n_epochs){' + 1' if args.inclusive_epochs else ''})")
    if args.dataset != "imagenet" and args.imagenet_warmup != "released":
        parser.error(f"--imagenet_warmup applies to imagenet.py only (CIFAR has no lr warm-up); got "
                     f"--imagenet_warmup {args.imagenet_warmup} for {args.dataset}")
    if args.dataset == "imagenet" and args.data_on_device:
        parser.error("--data-on-device keeps CIFAR on the device; ImageNet is read through its data loader")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's processes share the global batches
    if args.train_batch_size % world_size or args.test_batch_size % world_size:
        parser.error(f"--train_batch_size {args.train_batch_size} and --test_batch_size {args.test_batch_size} must "
                     f"be divisible by the {world_size} torchrun processes")
    try:
        [int(i) for i in str(args.gpu_ids).split(",")]
    except ValueError:
        parser.error(f"--gpu_ids {args.gpu_ids!r}: comma-separated integers (-1 for the CPU)")


def device_of(args):
    """--device when given, else the authors' --gpu_ids: the first id >= 0 when CUDA is available, else the CPU."""
    if args.device is not None:
        return args.device
    gpus = [int(i) for i in str(args.gpu_ids).split(",") if int(i) >= 0]
    return f"cuda:{gpus[0]}" if gpus and torch.cuda.is_available() else "cpu"


def config_text(args, parser):
    """The authors' config.txt: every option, non-defaults marked with their default."""
    lines = ["----------------- Options ---------------"]
    for k, v in sorted(vars(args).items()):
        default = parser.get_default(k)
        mark = f"\t[default: {default}]" if v != default else ""
        lines.append(f"{k:>25}: {str(v):<30}{mark}")
    lines.append("----------------- End -------------------")
    return "\n".join(lines) + "\n"
