"""One L-MCL iteration: the ordinary training loss (spec 3.2-3.6) and the bilevel meta step (3.7). The contrastive
part is CIFAR's in-batch contrast unless a caller passes its own (ImageNet's memory-bank contrast, mcl/memory_bank.py).

The meta step is functional (torch.func.functional_call): the virtual trajectory theta_0 -> theta_3 lives in
tensors of its own, so the real parameters need no snapshot/rollback. What the authors' in-place version leaves
behind is reproduced explicitly: the real parameters are untouched, and every BatchNorm layer gets one extra
running-statistics update from a train-mode forward at theta_0 (their last recomputation happens after the rollback).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.func import functional_call

from common.fast import at_least_fp32
from mcl.losses import distill_kl, mcl_loss, stage_ce_sum

LOSS_LOG = (("loss", "total", 1.0), ("loss_cls", "loss_cls", 1.0), ("loss_logit_kd", "loss_logit_kd", 1.0),
            ("loss_vcl", "vcl", "alpha"), ("loss_soft_vcl", "soft_vcl", "gamma"), ("loss_icl", "icl", "beta"),
            ("loss_soft_icl", "soft_icl", "lam"))  # log name, loss key, weight (the authors log weighted terms)


def training_loss(pair, embed_heads, aggregator, weight_net, x, y, args, contrast=None,
                  autocast=contextlib.nullcontext):
    """Forward everything and return every term of L = L_cls + L_kd + L_MCL (weights of the weight-net held
    constant, as in the ordinary step), plus the outputs. `contrast(embeddings, weights)` replaces the in-batch
    contrast of CIFAR when given. AUTOCAST() is the context of every module forward (bf16 on the fast path); every
    loss term upcasts half-precision inputs to float32 (common.fast.at_least_fp32)."""
    with autocast():
        features, logits = pair(x)
    with torch.no_grad(), autocast():
        weights = weight_net(features)
    stage_ce = [[F.cross_entropy(at_least_fp32(z), y) for z in net] for net in logits]
    with autocast():
        aggregated, stage_weights = aggregator(features, logits)
    aggregated_ce = [F.cross_entropy(at_least_fp32(z), y) for z in aggregated]
    loss_cls = sum(sum(row) for row in stage_ce) + sum(aggregated_ce)
    # each network's final head learns from the aggregated logits of every network, its own included
    kd_terms = [[distill_kl(net[-1], agg.detach(), args.kd_T) for agg in aggregated] for net in logits]
    loss_kd = sum(sum(row) for row in kd_terms)
    with autocast():
        embeddings = embed_heads(features)
    if contrast is None:
        mcl = mcl_loss(embeddings, weights, y, args.tau, args.kd_T, args.alpha, args.gamma, args.beta, args.lam)
    else:
        mcl = contrast(embeddings, weights)
    total = loss_cls + loss_kd + mcl["loss_mcl"]
    return {"features": features, "logits": logits, "aggregated_logits": aggregated,
            "aggregator_stage_weights": stage_weights, "lwn_weights": weights, "embeddings": embeddings,
            "stage_ce": stage_ce, "aggregated_ce": aggregated_ce, "loss_cls": loss_cls, "logit_kd_terms": kd_terms,
            "loss_logit_kd": loss_kd, **mcl, "total": total}


def make_optimizers(pair, embed_heads, aggregator, weight_net, args):
    """The scripts' two real optimizers (the virtual steps are MetaStep's own): Nesterov SGD, momentum 0.9, weight
    decay args.weight_decay on every parameter, lr args.init_lr until the epoch's lr is set (set_lr). `optimizer`
    updates the pair, the embed heads and the aggregator, in the authors' parameter order; `weight_optimizer` the
    loss-weight network (its only update is the meta step's)."""
    optimizer = torch.optim.SGD(list(pair.parameters()) + list(embed_heads.parameters()) +
                                list(aggregator.parameters()), lr=args.init_lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    weight_optimizer = torch.optim.SGD(weight_net.parameters(), lr=args.init_lr, momentum=0.9, nesterov=True,
                                       weight_decay=args.weight_decay)
    return optimizer, weight_optimizer


def train_step(pair, embed_heads, aggregator, weight_net, optimizer, x, y, args, autocast=contextlib.nullcontext):
    """One ordinary L-MCL iteration (the meta step is separate): the loss, its backward, one optimizer step.
    PAIR is the module to call (compiled / channels_last on the fast path)."""
    optimizer.zero_grad()
    out = training_loss(pair, embed_heads, aggregator, weight_net, x, y, args, autocast=autocast)
    out["total"].backward()
    optimizer.step()
    return out


class MetaStep:
    """The weight-net update: two virtual momentum-SGD steps on the weighted L_MCL, one on the head CEs, the
    hypergradient of the head CEs at theta_3 through the three steps, one weight_optimizer step.

    theta = the pair's and the embed heads' parameters (not the aggregator's). The reverse sweep follows the
    authors' MetaSGD recursion, alpha0 <- (1 - lr wd) alpha0 + c alpha1 + H v with c = 1 (their coefficient, the
    default) or c = wd (`exact=True`, the true hypergradient).
    """

    def __init__(self, pair, embed_heads, weight_net, args, exact=False):
        self.pair, self.embed_heads, self.weight_net = pair, embed_heads, weight_net
        self.args, self.exact = args, exact
        self.momentum, self.weight_decay = 0.9, args.weight_decay
        self.record = {}  # objective values of the last hypergradient, detached tensors (no host sync per meta step)

    def _theta(self):
        named = [("pair." + k, v) for k, v in self.pair.named_parameters()]
        named += [("embed." + k, v) for k, v in self.embed_heads.named_parameters()]
        return named

    def _forward(self, theta, buffers, x):
        pair_params = {k[5:]: v for k, v in theta.items() if k.startswith("pair.")}
        return functional_call(self.pair, {**pair_params, **buffers}, (x,))

    def _mcl(self, theta, phi, buffers, x, y):
        features, _ = self._forward(theta, buffers, x)
        weights = functional_call(self.weight_net, phi, (features,))
        embed_params = {k[6:]: v for k, v in theta.items() if k.startswith("embed.")}
        embeddings = functional_call(self.embed_heads, embed_params, (features,))
        return self.contrast(embeddings, weights, y)

    def contrast(self, embeddings, weights, y):
        """The weighted L_MCL terms (CIFAR: in-batch supervised contrast)."""
        a = self.args
        return mcl_loss(embeddings, weights, y, a.tau, a.kd_T, a.alpha, a.gamma, a.beta, a.lam)

    def reduce_hypergradient(self, hyper):
        """Single process: the hypergradient as it is (DDP runs average it over processes)."""
        return hyper

    def _ce(self, theta, buffers, x, y):
        return stage_ce_sum(self._forward(theta, buffers, x)[1], y)

    def _objective(self, s, theta, phi, buffers, x, y):
        """L_s: weighted L_MCL for the first `times` steps, head-CE sum for the last one."""
        if s < self.args.times:
            out = self._mcl(theta, phi, buffers, x, y)
            terms = {k: v.detach() for k, v in out.items() if k != "mcl_breakdown"}
            self.record.setdefault("inner", []).append(terms)
            return out["loss_mcl"]
        loss = self._ce(theta, buffers, x, y)
        self.record.setdefault("outer", []).append(loss.detach())
        return loss

    def hypergradient(self, x, y, lr):
        """The weight-net gradient G (dict name -> tensor) of the meta objective at the current parameters."""
        self.record = {}
        names = [k for k, _ in self._theta()]
        theta0 = {k: v.detach().clone().requires_grad_(True) for k, v in self._theta()}
        phi = {k: v.detach().clone().requires_grad_(True) for k, v in self.weight_net.named_parameters()}
        # train-mode virtual passes on copies of the BN buffers, so the real running statistics are not touched
        buffers = {k: v.clone() for k, v in self.pair.named_buffers()}
        m, wd = self.momentum, self.weight_decay

        trajectory, buf, theta = [], None, theta0
        for s in range(self.args.times + 1):
            loss = self._objective(s, theta, phi, buffers, x, y)
            grads = torch.autograd.grad(loss, [theta[k] for k in names], allow_unused=True)
            trajectory.append(theta)
            step = [(torch.zeros_like(theta[k]) if g is None else g.detach()) + wd * theta[k].detach()
                    for k, g in zip(names, grads)]
            buf = step if buf is None else [m * b + d for b, d in zip(buf, step)]
            theta = {k: (theta[k].detach() - lr * b).requires_grad_(True) for k, b in zip(names, buf)}

        outer = self._ce(theta, buffers, x, y)
        self.record.setdefault("outer", []).append(outer.detach())
        alpha0 = [g if g is not None else torch.zeros_like(theta[k]) for k, g in
                  zip(names, torch.autograd.grad(outer, [theta[k] for k in names], allow_unused=True))]
        alpha1 = [torch.zeros_like(a) for a in alpha0]
        hyper = {k: torch.zeros_like(v) for k, v in phi.items()}
        coefficient = wd if self.exact else 1.0
        phi_names = list(phi)
        for s in reversed(range(len(trajectory))):
            theta_s = trajectory[s]
            loss = self._objective(s, theta_s, phi, buffers, x, y)
            grads = torch.autograd.grad(loss, [theta_s[k] for k in names], create_graph=True, allow_unused=True)
            v = [-lr * a0 + a1 for a0, a1 in zip(alpha0, alpha1)]
            dot = sum((g * vi).sum() for g, vi in zip(grads, v) if g is not None)
            inputs = [theta_s[k] for k in names] + ([phi[k] for k in phi_names] if s < self.args.times else [])
            if torch.is_tensor(dot) and dot.requires_grad:
                second = torch.autograd.grad(dot, inputs, allow_unused=True)
            else:
                second = [None] * len(inputs)
            hv = [torch.zeros_like(a) if h is None else h for a, h in zip(alpha0, second[:len(names)])]
            for k, h in zip(phi_names, second[len(names):]):
                if h is not None:
                    hyper[k] += h
            alpha0, alpha1 = ([(1 - lr * wd) * a0 + coefficient * a1 + h for a0, a1, h in zip(alpha0, alpha1, hv)],
                              [m * a1 - lr * m * a0 for a0, a1 in zip(alpha0, alpha1)])
            alpha0 = [a.detach() for a in alpha0]
            alpha1 = [a.detach() for a in alpha1]
        return hyper

    def step(self, x, y, lr, weight_optimizer):
        hyper = self.reduce_hypergradient(self.hypergradient(x, y, lr))
        for k, p in self.weight_net.named_parameters():
            p.grad = hyper[k].detach().clone()
        weight_optimizer.step()
        with torch.no_grad():  # the authors' final recomputation at theta_0 updates every BN's running statistics
            self.pair(x)
        return hyper
