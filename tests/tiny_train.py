"""A minimal training script on the common contract (used by the tests, and the pattern every paper script follows).

    python tests/tiny_train.py --data-root DIR --run-dir RUN --epochs 2 [--resume] [--save-every-steps 3]

Setting TINY_TRAIN_KILL_AT_STEP=N makes the process SIGKILL itself right after global step N (and after any
checkpoint due at that step), which is how the tests interrupt a run at an exact point.
"""
import argparse
import os
import signal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import CHECKPOINT_NAME, ResumableEpoch, load_checkpoint, save_checkpoint
from common.data import CIFAR10_MEAN, CIFAR10_STD, cifar_datasets, cifar_test_transform, cifar_train_transform, \
    make_loader
from common.logging import FiniteGuard, RunLogger, add_common_args
from common.meters import AccuracyMeter, AverageMeter, Timer


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


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nan-from-epoch", type=int, default=0, help="make the loss NaN from this epoch on (tests)")
    add_common_args(parser)
    args = parser.parse_args()
    kill_at = int(os.environ.get("TINY_TRAIN_KILL_AT_STEP", "0"))

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    train_set, test_set = cifar_datasets("CIFAR10", args.data_root,
                                         cifar_train_transform(CIFAR10_MEAN, CIFAR10_STD, "constant", "crop_flip"),
                                         cifar_test_transform(CIFAR10_MEAN, CIFAR10_STD))
    train_loader = make_loader(train_set, args.batch_size, shuffle=True, workers=args.workers)
    test_loader = make_loader(test_set, 100)

    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[args.epochs // 2 + 1], gamma=0.1)
    logger = RunLogger(args.run_dir, args, script="tests/tiny_train.py", quiet=args.quiet)
    ckpt_path = os.path.join(args.run_dir, CHECKPOINT_NAME)
    meta = {"script": "tests/tiny_train.py", "arch": "tinynet"}

    start_epoch, epoch_resume = 0, None
    if args.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, expect_meta=meta, restore_rng=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, epoch_resume = ckpt["epoch"], ckpt.get("epoch_state")
        logger.truncate_after(start_epoch)

    def save(epoch, epoch_state=None):  # epoch = completed epochs; epoch_state for a checkpoint inside an epoch
        guard.check(f"epoch {epoch + 1}", ckpt_path if os.path.exists(ckpt_path) else None)
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict(), "epoch": epoch, "epoch_state": epoch_state},
                        meta=meta)

    guard = FiniteGuard()
    step_global = start_epoch * len(train_loader) + (epoch_resume or {}).get("step", 0)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        timer, loss_meter, train_acc = Timer(), AverageMeter(), AccuracyMeter()
        batches = ResumableEpoch(train_loader, resume=epoch_resume)
        if epoch_resume:  # the epoch's running meters continue where the checkpoint left them
            vars(loss_meter).update(epoch_resume["meters"]["loss"])
            vars(train_acc).update(epoch_resume["meters"]["acc"])
        epoch_resume = None
        for step, (x, y) in logger.progress(batches, desc=f"epoch {epoch + 1}", total=len(train_loader)):
            if args.steps_per_epoch and step >= args.steps_per_epoch:
                break
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if args.nan_from_epoch and epoch + 1 >= args.nan_from_epoch:
                loss = loss * float("nan")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            guard.update(loss)
            loss_meter.update(loss.item(), x.size(0))
            train_acc.update(logits, y)
            step_global += 1
            if args.save_every_steps and (step + 1) % args.save_every_steps == 0:
                save(epoch, dict(batches.state(step + 1), meters={"loss": vars(loss_meter), "acc": vars(train_acc)}))
            if kill_at and step_global == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        scheduler.step()

        model.eval()
        test_loss, test_acc = AverageMeter(), AccuracyMeter()
        with torch.no_grad():
            for i, (x, y) in enumerate(test_loader):
                if args.eval_batches and i >= args.eval_batches:
                    break
                logits = model(x)
                test_loss.update(F.cross_entropy(logits, y).item(), x.size(0))
                test_acc.update(logits, y)
        seconds = timer.elapsed()
        save(epoch + 1)
        logger.log_epoch({"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train/loss": loss_meter.avg,
                          "train/net/top1": train_acc.per_sample()[1], "test/net/loss": test_loss.avg,
                          "test/net/top1": test_acc.per_sample()[1], "test/net/top5": test_acc.per_sample()[5],
                          "epoch_time": seconds, "images_per_s": loss_meter.count / seconds})
    logger.finish({"test/net/top1": test_acc.per_sample()[1]})


if __name__ == "__main__":
    main()
