"""Deep mutual learning among m independent networks (no ramp, no alpha).

    python train_DML.py --model resnet32 --dataset CIFAR100            # each network <- mean of the others' logits
    python train_DML.py --model resnet32 --dataset CIFAR100 --type     # pairwise KL to every other network

L = sum_j CE(z_j) + sum_j KL_T(z_j; mean_{k != j} z_k). best.pth follows the mean of the networks' test top-1.
"""
from common.cli import run_main
from common.options import setup_run
from okddip.engine import (MAY_CHANGE, Method, base_parser, check_args, check_distillation_args, datasets,
                           default_run_dir, train)
from okddip.losses import dml_loss
from okddip.models import IndependentNets

SCRIPT = "okddip/train_DML.py"


def get_args_parser():
    p = base_parser(__doc__)
    p.add_argument("--num_branches", type=int, default=4)
    p.add_argument("--loss", default="KL", choices=["KL", "CE"])
    p.add_argument("--temperature", type=float, default=3.0)
    p.add_argument("--type", action="store_true", help="original pairwise DML (average of KLs to each other net)")
    return p


def build(args, num_classes):
    """The m networks and the DML loss (no ramp weight)."""
    return Method(students="dml", model=IndependentNets(args.model, num_classes, args.num_branches,
                                                        dropout=args.dropout),
                  forward=lambda net, x: net(x),
                  loss=lambda out, y, epoch: dml_loss(out, y, args.temperature, args.loss, pairwise=args.type),
                  select="test/mean/top1", milestones=tuple(args.schedule))


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    check_distillation_args(parser, args)
    if args.num_branches < 2:
        parser.error(f"--num_branches {args.num_branches}: DML needs at least 2 networks")
    train_set, test_set, num_classes = datasets(args)
    tag = f"{args.model}B{args.num_branches}T{args.temperature}S{args.loss}{args.version}"
    setup = setup_run(parser, args, SCRIPT, default_run_dir(args, f"DML/{tag}"), seed=args.seed, may_change=MAY_CHANGE)
    return train(setup, args, build(args, num_classes), train_set, test_set)


if __name__ == "__main__":
    run_main(main)
