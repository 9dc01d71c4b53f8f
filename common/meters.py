"""Meters: running averages, top-k accuracy (per-sample and per-batch-mean), timers."""
import time

import torch


class AverageMeter:
    """Running average weighted by n (pass n = batch size for a per-sample mean, n = 1 for a per-batch mean)."""

    def __init__(self):
        self.sum, self.count, self.val = 0.0, 0, 0.0

    def update(self, val, n=1):
        val = float(val)
        self.val = val
        self.sum += val * n
        self.count += n

    @property
    def avg(self):
        return self.sum / self.count if self.count else 0.0


@torch.no_grad()
def topk_correct(logits, target, topk=(1, 5)):
    """Number of samples whose target is among the k highest logits, for each k (a tensor on logits' device)."""
    maxk = min(max(topk), logits.size(1))
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return torch.stack([hit[:, : min(k, maxk)].any(dim=1).sum() for k in topk]).float()


def accuracy(logits, target, topk=(1, 5)):
    """Top-k accuracy of one batch in percent, as a list of floats."""
    return [100.0 * c / target.size(0) for c in topk_correct(logits, target, topk).tolist()]


class AccuracyMeter:
    """Top-k accuracy over an epoch, kept on the device until read (no host sync per batch).

    `per_sample` is the correct-count over all samples (the right number). `per_batch_mean` is the unweighted mean
    of the batches' accuracies, which several authors' scripts logged; it differs when the last batch is smaller.
    """

    def __init__(self, topk=(1, 5)):
        self.topk = tuple(topk)
        self.correct = None
        self.batch_acc_sum = None
        self.samples = 0
        self.batches = 0

    def update(self, logits, target):
        correct = topk_correct(logits.detach(), target, self.topk)
        batch_acc = correct * (100.0 / target.size(0))
        self.correct = correct if self.correct is None else self.correct + correct
        self.batch_acc_sum = batch_acc if self.batch_acc_sum is None else self.batch_acc_sum + batch_acc
        self.samples += target.size(0)
        self.batches += 1

    def per_sample(self):
        if not self.samples:
            return {k: 0.0 for k in self.topk}
        return dict(zip(self.topk, (100.0 * self.correct / self.samples).tolist()))

    def per_batch_mean(self):
        if not self.batches:
            return {k: 0.0 for k in self.topk}
        return dict(zip(self.topk, (self.batch_acc_sum / self.batches).tolist()))


class Timer:
    """Wall-clock timer; synchronises CUDA before reading so GPU work is counted."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter() - self.start

    def reset(self):
        self.start = time.perf_counter()
