"""A minimal training script on the repository's spine (the tests' subject, and the shape of every paper script).

    python tests/tiny_train.py --data-root DIR --run-dir RUN --epochs 2 [--resume] [--save-every-steps 3]
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.cli import run_main
from common.distributed import per_process_batch, train_sampler, wrap_ddp
from common.data import CIFAR10_MEAN, CIFAR10_STD, cifar_datasets, cifar_test_transform, cifar_train_transform, \
    make_loader
from common.fast import add_fast_args, at_least_fp32
from common.loop import Run, evaluate, fit
from common.meters import topk_accuracy
from common.options import add_run_args, check_positive, setup_run

SCRIPT = "tests/tiny_train.py"


class TinyNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)  # consumes the torch RNG inside the step, so resume must restore it
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--print-freq", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nan-at-step", type=int, default=0, help="make the loss NaN from this global step on")
    add_run_args(parser)
    add_fast_args(parser)
    return parser


class TinyRun(Run):
    def __init__(self, setup, args, test_loader):
        self.setup, self.test_loader, self.nan_at = setup, test_loader, args.nan_at_step
        self.net = TinyNet().to(setup.device)
        self.model = wrap_ddp(setup.fast.prepare(self.net), setup.ctx)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                         weight_decay=5e-4)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, [args.epochs // 2 + 1], 0.1)
        self.steps = 0

    def train_step(self, step, x, y):
        self.model.train()
        with self.setup.fast.autocast():
            logits = self.model(x)
        loss = F.cross_entropy(at_least_fp32(logits), y)
        self.steps += 1
        if self.nan_at and self.steps >= self.nan_at:
            loss = loss * float("nan")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), **topk_accuracy(logits, y, (1,), "net/")}

    def train_record(self, meter):
        return {"lr": self.optimizer.param_groups[0]["lr"], **meter.per_sample("train/")}

    def evaluate(self, epoch):
        self.model.eval()

        def forward(x, y):
            logits = self.model(x)
            return {"loss": F.cross_entropy(at_least_fp32(logits), y), **topk_accuracy(logits, y, (1, 5))}
        return evaluate(forward, self.test_loader, self.setup).per_sample("test/net/")

    def on_epoch_end(self, epoch, record):
        self.scheduler.step()

    def state_dict(self):
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "steps": self.steps}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, ["epochs", "lr", "batch_size"])
    setup = setup_run(parser, args, SCRIPT, default_run_dir="runs/tiny", seed=args.seed, streams=("torch", "numpy"))
    train_set, test_set = cifar_datasets("CIFAR10", args.data_root,
                                         cifar_train_transform(CIFAR10_MEAN, CIFAR10_STD, "constant", "crop_flip"),
                                         cifar_test_transform(CIFAR10_MEAN, CIFAR10_STD))
    batch = per_process_batch(args.batch_size, setup.ctx)
    train_loader = make_loader(train_set, batch, shuffle=True, workers=args.workers,
                               sampler=train_sampler(train_set, setup.ctx, seed=args.seed))
    test_loader = make_loader(test_set, 100, sampler=train_sampler(test_set, setup.ctx, shuffle=False))
    run = TinyRun(setup, args, test_loader)
    return fit(run, train_loader, setup, args.epochs, print_every=args.print_freq)


if __name__ == "__main__":
    run_main(main)
