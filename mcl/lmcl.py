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
from torch.profiler import record_function

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


class MetaStep:
    """The weight-net update: two virtual momentum-SGD steps on the weighted L_MCL, one on the head CEs, the
    hypergradient of the head CEs at theta_3 through the three steps, one weight_optimizer step.

    theta = the pair's and the embed heads' parameters (not the aggregator's). The reverse sweep follows the
    authors' MetaSGD recursion, alpha0 <- (1 - lr wd) alpha0 + c alpha1 + H v with c = 1 (their coefficient, the
    default) or c = wd (`exact=True`, the true hypergradient).

    Cost: each virtual step's gradient is taken with its graph (create_graph), and that graph is kept until the
    reverse sweep has taken its Hessian-vector product H_s v from it and is freed then. The authors' sweep instead
    re-evaluates L_s at theta_s and differentiates it again; the values are the same, the work is not (their meta
    iteration costs about 17 ordinary steps). RECOMPUTE=True (`--meta-recompute`) does as theirs: no graph is kept
    in the virtual steps, the sweep rebuilds each one, so about one graph is alive at a time (the kept graphs take
    several times an ordinary step's memory, which an ImageNet pair may not have on its GPU). theta_0 and phi are
    views of the real parameters (nothing is copied); theta_1 .. theta_3 are the new tensors of the virtual steps.
    Each phase is a named profiler range ("phase: ..."), which `python -m common.bench` reports as its share of the
    meta iteration (about 13 ordinary steps here; the table is in mcl/README.md, Performance).
    """

    def __init__(self, pair, embed_heads, weight_net, args, exact=False, recompute=False):
        self.pair, self.embed_heads, self.weight_net = pair, embed_heads, weight_net
        self.args, self.exact, self.recompute = args, exact, recompute
        self.momentum, self.weight_decay = 0.9, args.weight_decay
        # objective values of the last hypergradient, detached tensors (no host sync per meta step):
        # "inner": the weighted L_MCL terms at theta_0 .. theta_{times-1}; "outer": the head CEs at theta_times
        # (the last virtual step's objective) and at theta_{times+1} (the meta objective)
        self.record = {}
        self.pair_names = [k for k, _ in pair.named_parameters()]
        self.embed_names = [k for k, _ in embed_heads.named_parameters()]
        self.phi_names = [k for k, _ in weight_net.named_parameters()]

    def _theta(self):
        return [p for _, p in self.pair.named_parameters()] + [p for _, p in self.embed_heads.named_parameters()]

    def _forward(self, theta, buffers, x):
        params = dict(zip(self.pair_names, theta))
        return functional_call(self.pair, {**params, **buffers}, (x,))

    def _mcl(self, theta, phi, buffers, x, y):
        features, _ = self._forward(theta, buffers, x)
        weights = functional_call(self.weight_net, dict(zip(self.phi_names, phi)), (features,))
        embeddings = functional_call(self.embed_heads, dict(zip(self.embed_names, theta[len(self.pair_names):])),
                                     (features,))
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
        """L_s (weighted L_MCL for the first `times` steps, head-CE sum for the last one) and what the record keeps
        of it (its detached terms)."""
        if s < self.args.times:
            out = self._mcl(theta, phi, buffers, x, y)
            return out["loss_mcl"], {k: v.detach() for k, v in out.items() if k != "mcl_breakdown"}
        loss = self._ce(theta, buffers, x, y)
        return loss, loss.detach()

    def hypergradient(self, x, y, lr, update_bn=False):
        """The weight-net gradient G (dict name -> tensor) of the meta objective at the current parameters.
        UPDATE_BN: the pass at theta_0 updates the real BatchNorm running statistics, once (what the authors' last
        recomputation, L_0 at theta_0 after their rollback, leaves behind); every other pass, and every pass when
        false, runs on copies of the buffers (train-mode outputs do not depend on them)."""
        self.record = {"inner": [], "outer": []}
        real_buffers = dict(self.pair.named_buffers())
        copies = {k: v.clone() for k, v in real_buffers.items()}
        phi = [p.detach().requires_grad_(True) for p in self.weight_net.parameters()]
        m, wd, times = self.momentum, self.weight_decay, self.args.times

        theta = [p.detach().requires_grad_(True) for p in self._theta()]
        keep = not self.recompute
        steps, buf = [], None  # steps[s] = (theta_s, dL_s/dtheta_s with its graph, or None when recomputed)
        for s in range(times + 1):
            with record_function(f"phase: L_{s} and its gradient at theta_{s}" + (" (graph kept)" if keep else "")):
                buffers = real_buffers if update_bn and s == 0 else copies
                loss, logged = self._objective(s, theta, phi, buffers, x, y)
                grads = torch.autograd.grad(loss, theta, create_graph=keep, allow_unused=True)
            self.record["inner" if s < times else "outer"].append(logged)
            steps.append((theta, grads if keep else None))
            with torch.no_grad():
                # a parameter L_s does not reach (the classifiers in the MCL steps) still decays and keeps momentum
                d = [wd * t if g is None else g + wd * t for t, g in zip(theta, grads)]
                buf = d if buf is None else [m * b + e for b, e in zip(buf, d)]
                theta = [(t - lr * b).requires_grad_(True) for t, b in zip(theta, buf)]

        with record_function(f"phase: meta objective and its gradient at theta_{times + 1}"):
            outer = self._ce(theta, copies, x, y)
            alpha0 = [torch.zeros_like(t) if g is None else g
                      for t, g in zip(theta, torch.autograd.grad(outer, theta, allow_unused=True))]
        self.record["outer"].append(outer.detach())
        alpha1 = [torch.zeros_like(a) for a in alpha0]
        hyper = [torch.zeros_like(p) for p in phi]
        coefficient = wd if self.exact else 1.0
        for s in reversed(range(times + 1)):
            theta_s, grads = steps.pop()  # the graph of step s goes with it
            if grads is None:  # recompute: L_s and its gradient again, with the graph (the record keeps one value)
                with record_function(f"phase: L_{s} and its gradient again at theta_{s} (graph for the second order)"):
                    grads = torch.autograd.grad(self._objective(s, theta_s, phi, copies, x, y)[0], theta_s,
                                                create_graph=True, allow_unused=True)
            v = [-lr * a0 + a1 for a0, a1 in zip(alpha0, alpha1)]
            # H_s v and d<g_s, v>/dphi in one vector-Jacobian product of the gradient (phi enters the MCL steps only)
            # (at s = 0 only the phi part: H_0 v would only update the adjoints after their last use)
            live = [(g, vi) for g, vi in zip(grads, v) if g is not None and g.requires_grad]
            wrt_theta = theta_s if s > 0 else []
            inputs = wrt_theta + (phi if s < times else [])
            label = " and ".join(([f"H_{s} v"] if s > 0 else []) + ([f"d<g_{s}, v>/dphi"] if s < times else []))
            with record_function(f"phase: {label} (second order, at theta_{s})"):
                second = torch.autograd.grad([g for g, _ in live], inputs, grad_outputs=[vi for _, vi in live],
                                             allow_unused=True) if live else [None] * len(inputs)
            for h, g in zip(hyper, second[len(wrt_theta):]):
                if g is not None:
                    h += g
            if s == 0:
                break
            hv = [torch.zeros_like(a) if h is None else h for a, h in zip(alpha0, second[:len(theta_s)])]
            alpha0, alpha1 = ([(1 - lr * wd) * a0 + coefficient * a1 + h for a0, a1, h in zip(alpha0, alpha1, hv)],
                              [m * a1 - lr * m * a0 for a0, a1 in zip(alpha0, alpha1)])
        return dict(zip(self.phi_names, hyper))

    def step(self, x, y, lr, weight_optimizer):
        hyper = self.reduce_hypergradient(self.hypergradient(x, y, lr, update_bn=True))
        for k, p in self.weight_net.named_parameters():
            p.grad = hyper[k]
        weight_optimizer.step()
        return hyper
