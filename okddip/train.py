"""Baseline: one network trained with cross-entropy.

    python train.py --model resnet32 --dataset CIFAR100
    torchrun --nproc_per_node 8 train.py --model resnet34 --dataset imagenet --data-root IMAGENET ...
"""
from common.cli import run_main
from common.options import setup_run
from okddip.engine import MAY_CHANGE, Method, base_parser, check_args, datasets, default_run_dir, train
from okddip.losses import cross_entropy
from okddip.models import plain_network

SCRIPT = "okddip/train.py"


def get_args_parser():
    return base_parser(__doc__)


def build(args, num_classes):
    """The network and its loss L = CE(z, y); best.pth follows its test top-1."""
    def loss(out, y, epoch):
        total = cross_entropy(out["pro"], y)
        return total, {"total_loss": total}

    return Method(students=None, model=plain_network(args.model, num_classes, dropout=args.dropout),
                  forward=lambda net, x: {"pro": net(x)}, loss=loss, select="test/net/top1",
                  milestones=tuple(args.schedule))


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    train_set, test_set, num_classes = datasets(args)
    setup = setup_run(parser, args, SCRIPT, default_run_dir(args, f"{args.model}{args.version}"), seed=args.seed,
                      may_change=MAY_CHANGE)
    return train(setup, args, build(args, num_classes), train_set, test_set)


if __name__ == "__main__":
    run_main(main)
