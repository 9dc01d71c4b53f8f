"""ImageNet L-MCL: contrast against per-network memory banks instead of in-batch (spec 3.9).

Every training image n has a slot M_i[n] (128-d) in the memory of network i. The loader hands each sample an index
row [n, pos_k same-class indices, neg_k other-class indices]; the logits of an anchor embedding are its dot products
with the memory slots of that row, divided by tau. For head k of net a (embedding E) and head z of net b (F), with
w the loss-weight network's per-sample weight:

    ICL      C(M_a[idx] F, w, 1 + pos_k) + C(M_b[idx] E, w, 1 + pos_k)    positives: own slot + same-class slots
    soft ICL K(M_a[idx] F, M_b[idx] E) + K(M_b[idx] E, M_a[idx] F)           (teacher side detached)
    VCL      C(M_a[idx'] E, w, pos_k) + C(M_a[idx'] F, w, pos_k)              idx' = idx without the own slot
    soft VCL K between the two VCL logit rows, both ways

The second VCL term reads network a's memory, as the released code does; the other network's memory (M_b) is
evidently what was meant and `vcl_own_memory=True` uses it. After the loss, only the final head's embedding updates
the memory: M_i[n] <- normalise(m M_i[n] + (1 - m) e_i,final[n]), with the embeddings of every process.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset

from mcl.lmcl import MetaStep
from mcl.losses import weighted_soft_kl


class ContrastiveIndices(Dataset):
    """Wraps a labelled dataset (ImageFolder): item n -> (image, target) with target = [label, n, pos_k same-class
    indices, neg_k other-class indices] (the label and the index row in one tensor, so a batch is the (x, y) pair
    every training loop takes; MemoryBankRun splits it). Positives are drawn among the other images of the class (the anchor itself only
    for a single-image class), negatives uniformly among the images of the other classes, with replacement. Draws
    use torch's RNG (seeded per loader worker by the DataLoader)."""

    def __init__(self, dataset, pos_k=1, neg_k=8192):
        self.dataset, self.pos_k, self.neg_k = dataset, pos_k, neg_k
        targets = torch.as_tensor(dataset.targets)
        self.by_class = torch.argsort(targets, stable=True)  # indices grouped by class
        counts = torch.bincount(targets)
        starts = torch.cumsum(counts, 0) - counts
        self.label_of, self.count_of, self.start_of = targets, counts, starts
        self.rank_in_class = torch.empty_like(targets)
        self.rank_in_class[self.by_class] = torch.arange(len(targets)) - starts[targets[self.by_class]]
        if len(counts) < 2:
            raise ValueError("memory-bank contrast needs at least two classes (negatives are other-class images)")

    def __len__(self):
        return len(self.dataset)

    def contrast_row(self, n):
        c = int(self.label_of[n])
        count, start, total = int(self.count_of[c]), int(self.start_of[c]), len(self.label_of)
        if count > 1:  # skip the anchor's own position inside its class
            r = torch.randint(0, count - 1, (self.pos_k,))
            positives = self.by_class[start + r + (r >= self.rank_in_class[n]).long()]
        else:
            positives = torch.full((self.pos_k,), n, dtype=torch.long)
        r = torch.randint(0, total - count, (self.neg_k,))  # positions outside the class's block
        negatives = self.by_class[r + count * (r >= start).long()]
        return torch.cat([torch.tensor([n]), positives, negatives])

    def __getitem__(self, n):
        image, label = self.dataset[n]
        return image, torch.cat([torch.tensor([label]), self.contrast_row(n)])


class MemoryBank(nn.Module):
    """One (N_train x feat_dim) memory per network, buffers `memory_<i>`, initialised uniform in [-s, s] with
    s = 1/sqrt(feat_dim/3)."""

    def __init__(self, number_net, num_samples, feat_dim=128, momentum=0.5):
        super().__init__()
        self.number_net, self.momentum = number_net, momentum
        bound = 1.0 / math.sqrt(feat_dim / 3)
        for i in range(number_net):
            self.register_buffer(f"memory_{i}", torch.rand(num_samples, feat_dim).mul_(2 * bound).add_(-bound))

    def banks(self):
        return [getattr(self, f"memory_{i}") for i in range(self.number_net)]

    def moved_rows(self, bank, indices, embedding):
        rows = bank[indices] * self.momentum + embedding.detach() * (1 - self.momentum)
        return rows / rows.pow(2).sum(1, keepdim=True).pow(0.5)

    def updated(self, banks, indices, final_embeddings):
        """Copies of BANKS with the rows `indices` moved towards the final heads' embeddings."""
        return [bank.index_copy(0, indices, self.moved_rows(bank, indices, e))
                for bank, e in zip(banks, final_embeddings)]

    @torch.no_grad()
    def update_(self, indices, final_embeddings):
        for bank, e in zip(self.banks(), final_embeddings):
            bank.index_copy_(0, indices, self.moved_rows(bank, indices, e))


def gather_rows(tensor, ctx):
    """Concatenate a per-process tensor over processes along dim 0 (rank order); itself on one process."""
    if not ctx.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def memory_contrast(logits, weight, num_pos):
    # -1/B sum_n w_n 1/num_pos sum_{m < num_pos} [S_nm - log sum_m' exp S_nm'], every column in the denominator
    log_prob = logits[:, :num_pos] - torch.logsumexp(logits, 1, keepdim=True)
    return -(weight * log_prob.mean(1)).mean()


def memory_mcl_loss(embeddings, weights, banks, contrast_idx, tau=0.07, T=3.0, alpha=0.01, gamma=1.0, beta=0.01,
                    lam=1.0, pos_k=1, vcl_own_memory=False):
    """The four terms over ordered network pairs (i, j), i != j, and head pairs (k, z), in the weight-net's order.
    Each network's memory rows are gathered once and scored against every head's embedding in one product."""
    offsets = [sum(len(net) for net in embeddings[:i]) for i in range(len(embeddings))]
    every_head = torch.stack([e for net in embeddings for e in net], 2)  # B x d x heads
    scores = [torch.bmm(bank[contrast_idx], every_head) / tau for bank in banks]  # B x (1+pos_k+neg_k) x heads
    totals = [0.0, 0.0, 0.0, 0.0]
    count = 0
    for i in range(len(embeddings)):
        for j in range(len(embeddings)):
            if i == j:
                continue
            for k in range(len(embeddings[i])):
                for z in range(len(embeddings[j])):
                    w, a, b = weights[count], offsets[i] + k, offsets[j] + z
                    s_ab, s_ba = scores[i][:, :, b], scores[j][:, :, a]
                    icl = memory_contrast(s_ab, w, 1 + pos_k) + memory_contrast(s_ba, w, 1 + pos_k)
                    soft_icl = weighted_soft_kl(s_ab, s_ba.detach(), w, T) + weighted_soft_kl(s_ba, s_ab.detach(), w, T)
                    v_a, v_b = scores[i][:, 1:, a], scores[j if vcl_own_memory else i][:, 1:, b]
                    vcl = memory_contrast(v_a, w, pos_k) + memory_contrast(v_b, w, pos_k)
                    soft_vcl = weighted_soft_kl(v_a, v_b.detach(), w, T) + weighted_soft_kl(v_b, v_a.detach(), w, T)
                    totals = [t + v for t, v in zip(totals, (vcl, soft_vcl, icl, soft_icl))]
                    count += 1
    vcl, soft_vcl, icl, soft_icl = totals
    loss = alpha * vcl + gamma * soft_vcl + beta * icl + lam * soft_icl
    return {"loss_mcl": loss, "vcl": vcl, "soft_vcl": soft_vcl, "icl": icl, "soft_icl": soft_icl}


class MemoryBankContrast:
    """The contrast of one training step: scores the batch's index rows against the memory banks; `update_` then
    writes the final heads' embeddings of every process into the memory."""

    def __init__(self, memory, contrast_idx, args):
        self.memory, self.contrast_idx, self.args = memory, contrast_idx, args

    def __call__(self, embeddings, weights, banks=None):
        a = self.args
        return memory_mcl_loss(embeddings, weights, self.memory.banks() if banks is None else banks,
                               self.contrast_idx, a.tau, a.kd_T, a.alpha, a.gamma, a.beta, a.lam, a.pos_k,
                               a.vcl_own_memory)

    def gathered(self, embeddings, ctx):
        """The anchors' indices and final-head embeddings of every process (what updates the memory)."""
        return gather_rows(self.contrast_idx[:, 0], ctx), [gather_rows(net[-1].detach(), ctx) for net in embeddings]

    @torch.no_grad()
    def update_memory_(self, embeddings, ctx):
        self.memory.update_(*self.gathered(embeddings, ctx))


class MemoryBankMetaStep(MetaStep):
    """The meta step with the memory-bank contrast. Virtual step s reads the memory M_s: M_0 is the real memory,
    and each virtual MCL step's final-head embeddings give M_{s+1}, as the authors' in-place criterion does. Their
    rollback restores M_0 and their last recomputation (L_0 at theta_0) updates it once more, so the real memory
    ends as M_1. Across processes the virtual trajectories are each process's own (local batch, as the authors'
    unwrapped inner model); the hypergradient is averaged, as DDP averages the weight network's gradient."""

    def __init__(self, pair, embed_heads, weight_net, memory, args, ctx, exact=False, recompute=False):
        super().__init__(pair, embed_heads, weight_net, args, exact=exact, recompute=recompute)
        self.memory, self.ctx = memory, ctx

    def _objective(self, s, theta, phi, buffers, x, y):
        self.virtual_step = s
        return super()._objective(s, theta, phi, buffers, x, y)

    def contrast(self, embeddings, weights, y):
        s = self.virtual_step
        out = self.batch(embeddings, weights, banks=self.banks[s])
        # M_1 is always needed (it is the real memory afterwards); later ones only while virtual MCL steps follow
        if s + 1 not in self.banks and (s == 0 or s + 1 < self.args.times):
            with torch.no_grad():
                self.banks[s + 1] = self.memory.updated(self.banks[s], *self.batch.gathered(embeddings, self.ctx))
        return out

    def reduce_hypergradient(self, hyper):
        if self.ctx.distributed:
            for g in hyper.values():
                dist.all_reduce(g)
                g.div_(self.ctx.world_size)
        return hyper

    def step(self, x, y, lr, weight_optimizer, contrast_idx=None):
        self.batch = MemoryBankContrast(self.memory, contrast_idx, self.args)
        self.banks = {0: self.memory.banks()}
        hyper = super().step(x, y, lr, weight_optimizer)
        with torch.no_grad():
            for i, bank in enumerate(self.banks[1]):
                getattr(self.memory, f"memory_{i}").copy_(bank)
        self.banks = None
        return hyper
