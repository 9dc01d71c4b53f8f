"""DCM's loss: deep-supervised cross-entropies plus dense cross-network KL (the authors' `KL_divergence.py` + main.py).

Heads are named "n<net>.<head>" (n1.aux1, n1.aux2, n1.final, n2.aux1, ...). Every term is a small pure function.
The op order is the released one, which matters only for rounding: the 6 CE terms, then the double loop over heads,
each KL taking the (detached) teacher logits and computing both smoothed softmaxes itself; the total is a Python sum.
Logits are taken in at least float32 (bf16 autocast outputs are upcast, float64 stays float64).
"""
import torch
import torch.nn.functional as F

from common.fast import at_least_fp32

EPSILON = 1e-8


def smoothed_softmax(logits, eps=EPSILON):
    # p~ = (softmax(z) + eps) / (1 + C eps)
    return (F.softmax(at_least_fp32(logits), dim=1) + eps) / (1 + logits.size(1) * eps)


def kl_divergence(teacher_logits, student_logits):
    # KL(p~_t || p~_s) = (1/B) sum_b sum_c p~_t,bc log(p~_t,bc / p~_s,bc): log of the ratio, per-sample sums, batch mean
    p_teacher, p_student = smoothed_softmax(teacher_logits), smoothed_softmax(student_logits)
    return (p_teacher * torch.log(p_teacher / p_student)).sum(1).mean()


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
        for i, student in enumerate(logits):
            for j, teacher in enumerate(logits):
                if nets[i] != nets[j]:
                    terms.append(kl_divergence(teacher.detach(), student))
    return terms


def total_loss(terms):
    return sum(terms)
