"""Every loss of the released scripts as small pure functions. Nothing is detached unless stated.
Logits are taken in float32 (`.float()`, a no-op on the default path), so under --amp bf16 every softmax,
log-softmax, cross-entropy and KL term is still computed in float32.

Notation: z logits (B x C), y labels, T temperature, w ramp weight, alpha distillation weight.
Each method returns (total loss, dict of named terms); the dicts' logged_* entries are what the released scripts put
in train_true_loss / train_group_loss.
"""
import math

import torch
import torch.nn.functional as F


def kl_t(student, target, T):
    # KL_T(s; t) = T^2 / B * sum q (log q - log_softmax(s/T)),  q = softmax(t/T) + 1e-7 (not renormalised)
    q = F.softmax(target.float() / T, dim=1) + 1e-7
    return T * T * F.kl_div(F.log_softmax(student.float() / T, dim=1), q, reduction="batchmean")


def ce_t(student, target, T):
    # CE_T(s; t) = -T^2 / B * sum softmax(t/T) log_softmax(s/T)   (--loss CE)
    return -T * T * (F.softmax(target.float() / T, dim=1) * F.log_softmax(student.float() / T, dim=1)).sum(1).mean()


def distill(kind, T):
    if kind == "KL":
        return lambda s, t: kl_t(s, t, T)
    if kind == "CE":
        return lambda s, t: ce_t(s, t, T)
    raise ValueError(f"unknown --loss {kind!r}; valid: KL, CE")


def ramp_weight(epoch, num_epochs, start_consistency=0.0, length=80.0):
    # w(e) = exp(-5 (1 - clip(e - e0, 0, L) / L)^2), w = 1 before e0 = start_consistency * num_epochs
    if epoch < start_consistency * num_epochs:
        return 1.0
    if length == 0:
        return 1.0
    c = min(max(epoch - start_consistency * num_epochs, 0.0), length)
    return float(math.exp(-5.0 * (1.0 - c / length) ** 2))


def okddip_loss(out, y, w, alpha=1.0, T=3.0, kind="KL"):
    """L = sum_a CE(z_a) + CE(z_L) + alpha w (sum_a KL_T(z_a; x_m[a]) + KL_T(z_L; mean_a z_a)).

    Ensemble mode (no leader): L = sum_a CE(z_a) + alpha w sum_a KL_T(z_a; x_m[a]). Peer losses use the first
    out["num_peers"] columns (default: all); the leader target averages every returned column, which differs from
    the peers only for the released shared-block DenseNet (its forward returns all m branches as columns)."""
    dis = distill(kind, T)
    pro, x_m, leader = out["pro"].float(), out["x_m"].float(), out.get("leader")
    leader = None if leader is None else leader.float()
    peers = out.get("num_peers", pro.size(-1))
    ce_peer = [F.cross_entropy(pro[:, :, a], y) for a in range(peers)]
    kl_peer = [dis(pro[:, :, a], x_m[:, :, a]) for a in range(peers)]
    terms = {"ce_peer": ce_peer, "kl_peer_T2": kl_peer, "consistency_weight": w}
    true_loss, group_loss = sum(ce_peer), sum(kl_peer)
    total = true_loss + alpha * w * group_loss
    if leader is not None:
        terms["ce_leader"] = F.cross_entropy(leader, y)
        terms["kl_leader_T2"] = dis(leader, pro.mean(-1))
        total = total + terms["ce_leader"] + alpha * w * terms["kl_leader_T2"]
    terms.update(logged_train_true_loss=true_loss, logged_train_group_loss=group_loss, total_loss=total)
    return total, terms


def one_loss(out, y, w, alpha=1.0, T=3.0, kind="KL"):
    """ONE:    L = sum_i CE(z_i) + CE(x_m) + alpha w sum_i KL_T(z_i; x_m), x_m the gated ensemble (B x C).
    CL-ILR: L = sum_i CE(z_i) + alpha w sum_i KL_T(z_i; mean_{j != i} z_j)  (x_m is B x C x m).
    ind:    L = sum_i CE(z_i)  (x_m is None; group loss logged as 0)."""
    pro, x_m = out["pro"].float(), out["x_m"]
    x_m = None if x_m is None else x_m.float()
    ce_branch = [F.cross_entropy(pro[:, :, i], y) for i in range(pro.size(-1))]
    terms = {"ce_branch": ce_branch, "consistency_weight": w}
    true_loss = sum(ce_branch)
    if x_m is None:
        group_loss = torch.zeros((), device=pro.device)
    else:
        dis = distill(kind, T)
        if x_m.dim() == 2:
            terms["ce_gated_ensemble"] = F.cross_entropy(x_m, y)
            true_loss = true_loss + terms["ce_gated_ensemble"]
            terms["kl_branch_T2"] = [dis(pro[:, :, i], x_m) for i in range(pro.size(-1))]
        else:
            terms["kl_branch_T2"] = [dis(pro[:, :, i], x_m[:, :, i]) for i in range(pro.size(-1))]
        group_loss = sum(terms["kl_branch_T2"])
    total = true_loss + alpha * w * group_loss
    terms.update(logged_train_true_loss=true_loss, logged_train_group_loss=group_loss, total_loss=total)
    return total, terms


def dml_loss(out, y, T=3.0, kind="KL", pairwise=False):
    """Default ("ensemble first"): L = sum_j CE(z_j) + sum_j KL_T(z_j; mean_{k != j} z_k).
    --type (pairwise):          L = sum_j CE(z_j) + sum_j sum_{k != j} KL_T(z_j; z_k) / (m - 1).  No ramp, no alpha."""
    pro = out["pro"].float()
    m = pro.size(-1)
    dis = distill(kind, T)
    ce = [F.cross_entropy(pro[:, :, j], y) for j in range(m)]
    if pairwise:
        kl = [sum(dis(pro[:, :, j], pro[:, :, k]) for k in range(m) if k != j) / (m - 1) for j in range(m)]
    else:
        kl = [dis(pro[:, :, j], (pro.sum(-1) - pro[:, :, j]) / (m - 1)) for j in range(m)]
    total = sum(ce) + sum(kl)
    return total, {"ce": ce, "kl_T2": kl, "logged_train_true_loss": sum(ce), "logged_train_group_loss": sum(kl),
                   "total_loss": total}


def kd_loss(student, teacher, y, alpha=1.0, T=3.0, kind="KL"):
    """L = CE(z_s) + alpha KL_T(z_s; z_t), z_t from the frozen teacher (computed under no_grad by the caller)."""
    student, teacher = student.float(), teacher.float()
    ce = F.cross_entropy(student, y)
    kd = distill(kind, T)(student, teacher)
    total = ce + alpha * kd
    return total, {"logged_train_true_loss": ce, "logged_train_teacher_loss": kd, "total_loss": total}
