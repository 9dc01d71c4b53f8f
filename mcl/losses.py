"""L-MCL loss terms as small pure functions (CIFAR, in-batch supervised contrast). Notation of the spec: E, F unit
embeddings (B x 128), S = E F^T / tau, omega the per-sample weights of the loss-weight network, T the KL temperature."""
import torch
import torch.nn.functional as F

from common.fast import at_least_fp32


def contrast_masks(labels, dtype):
    """P: same class and not the anchor itself; O: every column but the anchor's own index (also across networks)."""
    off_diagonal = 1.0 - torch.eye(labels.size(0), dtype=dtype, device=labels.device)
    positives = labels.view(-1, 1).eq(labels.view(1, -1)).to(dtype) * off_diagonal
    return positives, off_diagonal


def weighted_supcon(similarity, weight, positives, off_diagonal):
    # C(S, w) = -1/B sum_n w_n 1/|P(n)| sum_m P_nm [S_nm - log sum_m' O_nm' exp(S_nm')]
    log_prob = similarity - torch.log((torch.exp(similarity) * off_diagonal).sum(1, keepdim=True))
    mean_log_prob_pos = (positives * log_prob).sum(1) / positives.sum(1)
    return -(weight * mean_log_prob_pos).mean()


def weighted_soft_kl(student, teacher, weight, T):
    # K(S, R, w) = T^2/B sum_n w_n KL(softmax(R_n/T) || softmax(S_n/T)), full rows, teacher detached by the caller
    kl = F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1), reduction="none").sum(1)
    return (kl * weight).mean() * T ** 2


def mcl_pair_terms(e_a, e_b, weight, positives, off_diagonal, tau, T):
    """VCL, soft VCL, ICL, soft ICL for head k of net a (e_a) and head z of net b (e_b), both orderings inside."""
    s_ab, s_ba = e_a @ e_b.T / tau, e_b @ e_a.T / tau
    s_aa, s_bb = e_a @ e_a.T / tau, e_b @ e_b.T / tau
    vcl = weighted_supcon(s_aa, weight, positives, off_diagonal) + weighted_supcon(s_bb, weight, positives, off_diagonal)
    soft_vcl = weighted_soft_kl(s_aa, s_bb.detach(), weight, T) + weighted_soft_kl(s_bb, s_aa.detach(), weight, T)
    icl = weighted_supcon(s_ab, weight, positives, off_diagonal) + weighted_supcon(s_ba, weight, positives, off_diagonal)
    soft_icl = weighted_soft_kl(s_ab, s_ba.detach(), weight, T) + weighted_soft_kl(s_ba, s_ab.detach(), weight, T)
    return vcl, soft_vcl, icl, soft_icl


def mcl_loss(embeddings, weights, labels, tau=0.1, T=3.0, alpha=0.1, gamma=1.0, beta=0.1, lam=1.0):
    """Sum of the four terms over ordered network pairs (i, j), i != j, and head pairs (k, z), in the weight-net's
    order. L_MCL = alpha VCL + gamma SoftVCL + beta ICL + lam SoftICL. Both orderings are summed, as the authors do:
    the (j, i) half repeats the (i, j) half exactly, so the totals are twice the 9-combination sums."""
    embeddings = [[at_least_fp32(e) for e in net] for net in embeddings]
    weights = [at_least_fp32(w) for w in weights]
    positives, off_diagonal = contrast_masks(labels, embeddings[0][0].dtype)
    totals = [0.0, 0.0, 0.0, 0.0]
    breakdown = []
    count = 0
    n = len(embeddings)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            for k in range(len(embeddings[i])):
                for z in range(len(embeddings[j])):
                    terms = mcl_pair_terms(embeddings[i][k], embeddings[j][z], weights[count], positives,
                                           off_diagonal, tau, T)
                    totals = [t + v for t, v in zip(totals, terms)]
                    breakdown.append({"count": count, "i": i, "j": j, "k": k, "z": z,
                                      **dict(zip(("vcl", "soft_vcl", "icl", "soft_icl"), terms))})
                    count += 1
    vcl, soft_vcl, icl, soft_icl = totals
    loss = alpha * vcl + gamma * soft_vcl + beta * icl + lam * soft_icl
    return {"loss_mcl": loss, "vcl": vcl, "soft_vcl": soft_vcl, "icl": icl, "soft_icl": soft_icl,
            "mcl_breakdown": breakdown}


def distill_kl(student_logits, teacher_logits, T):
    # T^2 KL(softmax(t/T) || softmax(s/T)), batch mean
    student_logits, teacher_logits = at_least_fp32(student_logits), at_least_fp32(teacher_logits)
    return F.kl_div(F.log_softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1),
                    reduction="batchmean") * T ** 2


def stage_ce_sum(logits, labels):
    # sum_a sum_k CE(z_ak, y): the objective of the CE virtual step and of the meta objective
    return sum(F.cross_entropy(at_least_fp32(z), labels) for net in logits for z in net)
