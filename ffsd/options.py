"""The authors' options (`options/options.py`, program name FFSD), plus this repository's run-management options.

Visdom/HTML display options are accepted and ignored (log.jsonl and tensorboardX events replace them).
"""
import argparse

from common.fast import add_fast_args, resolve_fast_args
from common.logging import add_common_args

from ffsd.models import MODELS


def build_parser(dataset="cifar100"):
    p = argparse.ArgumentParser(prog="FFSD", description="Feature Fusion and Self-Distillation (online KD)")
    # --dataroot is the authors' name of --data-root (common option); it is not required here.
    p.add_argument("--dataset", default=dataset, choices=[dataset], help="dataset (this script: %(default)s)")
    p.add_argument("--name", default="default", help="experiment folder name under --checkpoints_dir")
    p.add_argument("--gpu_ids", default="0", help="comma-separated GPU ids, -1 for CPU; the first is used")
    p.add_argument("--checkpoints_dir", default="./experiments", help="outputs go to <checkpoints_dir>/<name> "
                   "unless --run-dir is given")
    p.add_argument("--phase", default="train", help="unused (as released)")
    p.add_argument("--load_path", default=None, help="test.py: the leader checkpoint to evaluate")
    p.add_argument("--model", default="resnet32", help="architecture: " + ", ".join(MODELS[dataset]))
    p.add_argument("--train_batch_size", type=int, default=128)
    p.add_argument("--test_batch_size", type=int, default=128)
    for flag, kind, default in (("--display_freq", int, 400), ("--display_ncols", int, 4), ("--display_id", int, 1),
                                ("--display_server", str, "http://localhost"), ("--display_env", str, "main"),
                                ("--display_port", int, 8097), ("--update_html_freq", int, 1000),
                                ("--print_freq", int, 100), ("--display_winsize", int, 256)):
        p.add_argument(flag, type=kind, default=default, help="accepted and ignored (visdom/HTML display)")
    p.add_argument("--no_html", action="store_true", help="accepted and ignored")
    p.add_argument("--continue_train", dest="resume", action="store_true",
                   help="resume from <run dir>/checkpoint.pt (same as --resume)")
    p.add_argument("--start_epoch", type=int, default=1, help="first epoch of the loop (sets the lambda warm-up)")
    p.add_argument("--n_epochs", type=int, default=300,
                   help="loop end, exclusive as released: 300 gives 299 epochs (see --inclusive_epochs)")
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
    g.add_argument("--workers", type=int, default=8, help="data loader workers (released: 8)")
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
    add_common_args(p, data_root_default="./data", data_root_flags=("--data-root", "--dataroot"))
    add_fast_args(p)
    p.set_defaults(device=None)  # None: derived from --gpu_ids
    return p


def parse(argv=None, dataset="cifar100"):
    parser = build_parser(dataset)
    args = parser.parse_args(argv)
    if args.model not in MODELS[dataset]:
        parser.error(f"unknown --model {args.model!r} for {dataset}; valid: {', '.join(MODELS[dataset])}")
    if args.model_num < 2:
        parser.error(f"--model_num must be at least 2 (the students distil from each other; the released code "
                     f"divides by model_num - 1); got {args.model_num}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be positive; got {args.temperature}")
    if args.start_epoch < 1:
        parser.error(f"--start_epoch must be >= 1; got {args.start_epoch}")
    if dataset != "imagenet" and args.imagenet_warmup != "released":
        parser.error(f"--imagenet_warmup applies to imagenet.py only (CIFAR has no lr warm-up); got "
                     f"--imagenet_warmup {args.imagenet_warmup} for {dataset}")
    if args.train_batch_size < 1 or args.test_batch_size < 1:
        parser.error("--train_batch_size and --test_batch_size must be positive")
    if args.device is None:
        import torch
        gpu = [int(i) for i in str(args.gpu_ids).split(",") if int(i) >= 0]
        args.device = f"cuda:{gpu[0]}" if gpu and torch.cuda.is_available() else "cpu"
    resolve_fast_args(args)  # after the device: --fast depends on it
    if dataset != "cifar100" and args.data_on_device:
        if not args.fast:
            parser.error("--data-on-device keeps CIFAR on the device; ImageNet is read through its data loader")
        args.data_on_device = False  # --fast on ImageNet: the rest of the fast path only
    return args


def config_text(args, parser):
    """The authors' config.txt: every option, non-defaults marked with their default."""
    lines = ["----------------- Options ---------------"]
    for k, v in sorted(vars(args).items()):
        default = parser.get_default(k)
        mark = f"\t[default: {default}]" if v != default else ""
        lines.append(f"{k:>25}: {str(v):<30}{mark}")
    lines.append("----------------- End -------------------")
    return "\n".join(lines) + "\n"
