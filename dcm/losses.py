"""DCM's loss: deep-supervised cross-entropies plus dense cross-network KL (the authors' `KL_divergence.py` + main.py).

Heads are named "n<net>.<head>" (n1.aux1, n1.aux2, n1.final, n2.aux1, ...). Every term is a small pure function; the
total is a Python sum in the released order (6 CE, then the double loop over heads), which matters only for rounding.
"""
import torch
import torch.nn.functional as F

EPSILON = 1e-8


def at_least_fp32(logits):
    """The released code casts the logits to fp32 before the loss; float64 (parity references) stays float64."""
    return logits if logits.dtype == torch.float64 else logits.float()


def smoothed_softmax(logits, eps=EPSILON):
    # p~ = (softmax(z) + eps) / (1 + C eps)
    return (F.softmax(at_least_fp32(logits), dim=1) + eps) / (1 + logits.size(1) * eps)


def kl_divergence(p_teacher, p_student):
    # KL(P || Q) = (1/B) sum_b sum_c P_bc log(P_bc / Q_bc), computed as log of the ratio as released
    return (p_teacher * torch.log(p_teacher / p_student)).sum() / p_teacher.size(0)


def cross_entropy(logits, target):
    # CE(z, y) = -(1/B) sum_b log softmax(z_b)[y_b]
    return F.cross_entropy(at_least_fp32(logits), target)


def head_names(outputs_per_net):
    """["n1.aux1", "n1.aux2", "n1.final", "n2.aux1", ...] for a list of per-network output tuples."""
    names = []
    for net, outputs in enumerate(outputs_per_net, 1):
        heads = ("aux1", "aux2", "final") if len(outputs) == 3 else ("final",)
        names += [f"n{net}.{h}" for h in heads]
    return names


def term_names(outputs_per_net, distill=True):
    """Names of the loss terms, in the order loss_terms() returns them (the fixtures' `loss_term_names`)."""
    names = head_names(outputs_per_net)
    nets = [n.split(".")[0] for n in names]
    ce = [f"CE({n})" for n in names]
    if not distill:
        return ce
    kl = [f"KL(p[{names[j]}].detach() || p[{names[i]}])"
          for i in range(len(names)) for j in range(len(names)) if nets[i] != nets[j]]
    return ce + kl


def loss_terms(outputs_per_net, target, distill=True):
    """All loss terms as a list of scalar tensors.

    L = sum_{a,k} CE(z_a^k, y) + sum_{a != b} sum_{k,l} KL(sg(p~_b^l) || p~_a^k)

    With 3 heads per network and 2 networks this is DCM's 6 CE + 18 KL terms; with final heads only it is DML's
    CE1 + CE2 + KL(sg p~2 || p~1) + KL(sg p~1 || p~2); with distill=False it is independent training (CE only).
    Only pairs of heads in different networks are distilled; the teacher side is detached.
    """
    logits = [z for outputs in outputs_per_net for z in outputs]
    nets = [net for net, outputs in enumerate(outputs_per_net) for _ in outputs]
    terms = [cross_entropy(z, target) for z in logits]
    if distill:
        probs = [smoothed_softmax(z) for z in logits]
        for i in range(len(logits)):
            for j in range(len(logits)):
                if nets[i] != nets[j]:
                    terms.append(kl_divergence(probs[j].detach(), probs[i]))
    return terms


def total_loss(terms):
    return sum(terms)
