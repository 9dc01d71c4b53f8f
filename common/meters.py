"""Meters: named running sums kept on the device, top-k accuracy, a wall-clock timer.

`Meter` is the one meter of the repository: every training loop and every evaluation feeds it a dict of 0-d tensors
per batch, `update(values, n)`, and reads means once, at the epoch end. It keeps, in float64 on the values' device,
the sum of value x n (for the per-sample mean, the right number) and the sum of values (for the unweighted mean over
batches, which several authors' scripts logged; they differ when the last batch is smaller). No host sync per batch.
"""
import time

import torch

from common.distributed import all_reduce_sum


class Meter:
    def __init__(self):
        self.names = []           # in order of first appearance
        self.sums = None          # float64 (2, len(names)): [sum of value x n, sum of value]
        self.samples = []         # per name: sum of n
        self.batches = []         # per name: number of updates
        self._index = {}          # tuple of names -> (positions, index tensor): one index_add per update

    def update(self, values, n=1):
        """Add one batch: VALUES {name: 0-d tensor or number}, N samples."""
        if not values:
            return
        names = tuple(values)
        new = [k for k in names if k not in self.names]
        if new:
            self.names += new
            self.samples += [0] * len(new)
            self.batches += [0] * len(new)
        device = next((v.device for v in values.values() if torch.is_tensor(v)), torch.device("cpu"))
        row = torch.stack([(v.detach() if torch.is_tensor(v) else torch.tensor(v, device=device))
                           .to(torch.float64).reshape(()) for v in values.values()])
        if self.sums is None or self.sums.size(1) < len(self.names) or self.sums.device != row.device:
            grown = torch.zeros(2, len(self.names), dtype=torch.float64, device=row.device)
            if self.sums is not None:
                grown[:, : self.sums.size(1)] = self.sums.to(row.device)
            self.sums = grown
        cached = self._index.get(names)
        if cached is None or cached[1].device != row.device:
            positions = [self.names.index(k) for k in names]
            cached = self._index[names] = (positions, torch.tensor(positions, device=row.device))
        positions, index = cached
        self.sums.index_add_(1, index, torch.stack([row * n, row]))
        for i in positions:
            self.samples[i] += n
            self.batches[i] += 1

    def per_sample(self, prefix=""):
        """{prefix + name: sum of value x n / sum of n} as floats (one host read)."""
        sums = self.sums[0].tolist() if self.sums is not None else []
        return {prefix + k: s / max(c, 1) for k, s, c in zip(self.names, sums, self.samples)}

    def per_batch(self, prefix=""):
        """{prefix + name: mean of the batches' values} as floats (one host read)."""
        sums = self.sums[1].tolist() if self.sums is not None else []
        return {prefix + k: s / max(c, 1) for k, s, c in zip(self.names, sums, self.batches)}

    @property
    def count(self):
        """Samples seen (by the names updated most)."""
        return max(self.samples, default=0)

    def all_reduce(self, ctx):
        """Sum the meter over the processes of a distributed run (every process must hold the same names)."""
        if not getattr(ctx, "distributed", False) or self.sums is None:
            return self
        packed = torch.cat([self.sums.reshape(-1), torch.tensor(self.samples + self.batches, dtype=torch.float64,
                                                                 device=self.sums.device)])
        all_reduce_sum(packed, ctx)
        k = len(self.names)
        self.sums = packed[: 2 * k].reshape(2, k)
        self.samples = [int(v) for v in packed[2 * k: 3 * k].tolist()]
        self.batches = [int(v) for v in packed[3 * k:].tolist()]
        return self

    def state_dict(self):
        return {"names": list(self.names), "sums": None if self.sums is None else self.sums.cpu(),
                "samples": list(self.samples), "batches": list(self.batches)}

    def load_state_dict(self, state, device=None):
        self.names, self.samples, self.batches = list(state["names"]), list(state["samples"]), list(state["batches"])
        self.sums = None if state["sums"] is None else state["sums"].to(device or "cpu")
        self._index = {}
        return self


@torch.no_grad()
def topk_correct(logits, target, topk=(1, 5)):
    """Number of samples whose target is among the k highest logits, for each k (a tensor on logits' device)."""
    maxk = min(max(topk), logits.size(1))
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return torch.stack([hit[:, : min(k, maxk)].any(dim=1).sum() for k in topk]).to(torch.float64)


def topk_accuracy(logits, target, topk=(1, 5), prefix=""):
    """{prefix + 'top<k>': batch accuracy in percent (0-d tensor)} for Meter.update."""
    correct = topk_correct(logits, target, topk) * (100.0 / target.size(0))
    return {f"{prefix}top{k}": c for k, c in zip(topk, correct.unbind())}


class Timer:
    """Wall-clock timer; synchronises CUDA before reading so GPU work is counted."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter() - self.start
