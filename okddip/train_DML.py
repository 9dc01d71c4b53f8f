"""Deep mutual learning among m independent networks (no ramp, no alpha).

    python train_DML.py --model resnet32 --dataset CIFAR100            # each network <- mean of the others' logits
    python train_DML.py --model resnet32 --dataset CIFAR100 --type     # pairwise KL to every other network

L = sum_j CE(z_j) + sum_j KL_T(z_j; mean_{k != j} z_k). best.pth follows the mean of the networks' test top-1.
"""
from common.fast import autocast
from okddip.engine import base_parser, check_args, count_classes, default_run_dir, train
from okddip.losses import dml_loss
from okddip.models import IndependentNets

SCRIPT = "okddip/train_DML.py"


def parser():
    p = base_parser(__doc__)
    p.add_argument("--num_branches", type=int, default=4)
    p.add_argument("--loss", default="KL", choices=["KL", "CE"])
    p.add_argument("--temperature", type=float, default=3.0)
    p.add_argument("--type", action="store_true", help="original pairwise DML (average of KLs to each other net)")
    return p


def build(args, num_classes):
    """The model and step(net, x, y, epoch) -> (loss, terms, out): forward (autocast when --amp), then the loss."""
    model = IndependentNets(args.model, num_classes, args.num_branches, dropout=args.dropout)

    def step(net, x, y, epoch):
        with autocast(args, x.device):
            out = net(x)
        loss, terms = dml_loss(out, y, args.temperature, args.loss, pairwise=args.type)
        return loss, terms, out

    return model, step


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    check_args(args)
    if args.num_branches < 2:
        p.error(f"--num_branches {args.num_branches}: DML needs at least 2 networks")
    model, step = build(args, count_classes(args))

    tag = f"{args.model}B{args.num_branches}T{args.temperature}S{args.loss}{args.version}"
    meta = {"method": "dml", "num_branches": args.num_branches, "type": args.type}
    train(args, SCRIPT, "dml", model, step, meta, "test/mean/top1", default_run_dir(args, f"DML/{tag}"))


if __name__ == "__main__":
    main()
