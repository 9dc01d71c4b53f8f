"""Baseline: one network trained with cross-entropy.

    python train.py --model resnet32 --dataset CIFAR100
    torchrun --nproc_per_node 8 train.py --model resnet34 --dataset imagenet --data-root IMAGENET ...
"""
import torch.nn.functional as F

from okddip.engine import base_parser, check_args, count_classes, default_run_dir, train
from okddip.models import plain_network

SCRIPT = "okddip/train.py"


def main(argv=None):
    p = base_parser(__doc__)
    args = p.parse_args(argv)
    check_args(args)
    model = plain_network(args.model, count_classes(args), dropout=args.dropout)

    def step(net, x, y, epoch):
        z = net(x)
        loss = F.cross_entropy(z, y)  # L = CE(z, y)
        return loss, {"total_loss": loss}, {"pro": z}

    train(args, SCRIPT, None, model, step, {"method": "baseline"}, "test/net/top1",
          default_run_dir(args, f"{args.model}{args.version}"))


if __name__ == "__main__":
    main()
