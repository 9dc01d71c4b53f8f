"""Baseline: one network trained with cross-entropy.

    python train.py --model resnet32 --dataset CIFAR100
    torchrun --nproc_per_node 8 train.py --model resnet34 --dataset imagenet --data-root IMAGENET ...
"""
from common.fast import autocast
from okddip.engine import base_parser, check_args, count_classes, default_run_dir, train
from okddip.losses import cross_entropy
from okddip.models import plain_network

SCRIPT = "okddip/train.py"


def parser():
    return base_parser(__doc__)


def build(args, num_classes):
    """The model and step(net, x, y, epoch) -> (loss, terms, out): forward (autocast when --amp), then the loss."""
    model = plain_network(args.model, num_classes, dropout=args.dropout)

    def step(net, x, y, epoch):
        with autocast(args, x.device):
            z = net(x)
        loss = cross_entropy(z, y)  # L = CE(z, y)
        return loss, {"total_loss": loss}, {"pro": z}

    return model, step


def main(argv=None):
    args = parser().parse_args(argv)
    check_args(args)
    model, step = build(args, count_classes(args))

    train(args, SCRIPT, None, model, step, {"method": "baseline"}, "test/net/top1",
          default_run_dir(args, f"{args.model}{args.version}"))


if __name__ == "__main__":
    main()
