"""Every loss of the released scripts as small pure functions. Nothing is detached unless stated.

Logits are taken in at least float32 (`common.fast.at_least_fp32`: a no-op in float32 and float64), so under
--amp bf16 every softmax, log-softmax, cross-entropy and KL term is computed in float32, and the parity checker's
float64 pass stays in float64 end to end.

Terms are computed and summed in the released scripts' order (per student: CE, then its KL; accumulated from 0), so
a float32 run rounds as the authors' did.

Notation: z logits (B x C), y labels, T temperature, w ramp weight, alpha distillation weight.
Each method returns (total loss, dict of named terms); the dicts' logged_* entries are what the released scripts put
in train_true_loss / train_group_loss.
"""
import numpy as np
import torch
import torch.nn.functional as F

from common.fast import at_least_fp32

KL_EPSILON = 1e-7  # added to the target probabilities, not renormalised (released utils.KL_Loss)


def cross_entropy(logits, y):
    # CE(z, y) = -(1/B) sum_b log softmax(z_b)[y_b]
    return F.cross_entropy(at_least_fp32(logits), y)


def kl_t(student, target, T):
    # KL_T(s; t) = T^2 / B * sum_bc q (log q - log_softmax(s/T)),  q = softmax(t/T) + 1e-7
    log_p = F.log_softmax(at_least_fp32(student) / T, dim=1)
    q = F.softmax(at_least_fp32(target) / T, dim=1) + KL_EPSILON
    return T * T * F.kl_div(log_p, q, reduction="batchmean")


def ce_t(student, target, T):
    # CE_T(s; t) = -T^2 / B * sum_bc softmax(t/T) log_softmax(s/T)   (--loss CE)
    log_p = F.log_softmax(at_least_fp32(student) / T, dim=1)
    q = F.softmax(at_least_fp32(target) / T, dim=1)
    return -T * T * torch.sum(log_p * q) / q.size(0)


def distill(kind, T):
    if kind == "KL":
        return lambda s, t: kl_t(s, t, T)
    if kind == "CE":
        return lambda s, t: ce_t(s, t, T)
    raise ValueError(f"unknown --loss {kind!r}; valid: KL, CE")


def ramp_weight(epoch, num_epochs, start_consistency=0.0, length=80.0):
    # w(e) = 1 for e < e0 = start_consistency * num_epochs, else exp(-5 phase^2), phase = 1 - clip(e - e0, 0, L) / L
    consistency_epoch = start_consistency * num_epochs
    if epoch < consistency_epoch or length == 0:
        return 1.0
    phase = 1.0 - np.clip(epoch - consistency_epoch, 0.0, length) / length
    return float(np.exp(-5.0 * phase * phase))  # float64, as released (numpy)


def okddip_loss(out, y, w, alpha=1.0, T=3.0, kind="KL"):
    """L = sum_a CE(z_a) + CE(z_L) + alpha w (sum_a KL_T(z_a; x_m[a]) + KL_T(z_L; mean z)).

    Ensemble mode (no leader): L = sum_a CE(z_a) + alpha w sum_a KL_T(z_a; x_m[a]). Peer losses use the first
    out["num_peers"] columns (default: all); the leader target averages every returned column, which differs from
    the peers only for the released shared-block DenseNet (its forward returns all m branches as columns)."""
    dis = distill(kind, T)
    pro, x_m = at_least_fp32(out["pro"]), at_least_fp32(out["x_m"])
    peers = out.get("num_peers", pro.size(-1))
    ce_peer, kl_peer, true_loss, group_loss = [], [], 0, 0
    for a in range(peers):
        ce_peer.append(cross_entropy(pro[:, :, a], y))
        true_loss = true_loss + ce_peer[a]
        kl_peer.append(dis(pro[:, :, a], x_m[:, :, a]))
        group_loss = group_loss + kl_peer[a]
    terms = {"ce_peer": ce_peer, "kl_peer_T2": kl_peer, "consistency_weight": w}
    if out.get("leader") is None:
        total = true_loss + alpha * w * group_loss
    else:
        leader = at_least_fp32(out["leader"])
        terms["ce_leader"] = cross_entropy(leader, y)
        supervised = true_loss + terms["ce_leader"]
        terms["kl_leader_T2"] = dis(leader, pro.mean(-1))
        total = supervised + alpha * w * (group_loss + terms["kl_leader_T2"])
    terms.update(logged_train_true_loss=true_loss, logged_train_group_loss=group_loss, total_loss=total)
    return total, terms


def one_loss(out, y, w, alpha=1.0, T=3.0, kind="KL"):
    """ONE:    L = sum_i CE(z_i) + CE(x_m) + alpha w sum_i KL_T(z_i; x_m), x_m the gated ensemble (B x C).
    CL-ILR: L = sum_i CE(z_i) + alpha w sum_i KL_T(z_i; mean_{j != i} z_j)  (x_m is B x C x m).
    ind:    L = sum_i CE(z_i)  (x_m is None; the group loss is a logged zero)."""
    pro, x_m = at_least_fp32(out["pro"]), out["x_m"]
    ce_branch, true_loss, group_loss = [], 0, 0
    terms = {"ce_branch": ce_branch, "consistency_weight": w}
    if x_m is None:
        for i in range(pro.size(-1)):
            ce_branch.append(cross_entropy(pro[:, :, i], y))
            true_loss = true_loss + ce_branch[i]
        group_loss = group_loss + torch.zeros((), dtype=pro.dtype, device=pro.device)
    else:
        dis, x_m = distill(kind, T), at_least_fp32(x_m)
        gated = x_m.dim() == 2
        terms["kl_branch_T2"] = []
        for i in range(pro.size(-1)):
            ce_branch.append(cross_entropy(pro[:, :, i], y))
            true_loss = true_loss + ce_branch[i]
            terms["kl_branch_T2"].append(dis(pro[:, :, i], x_m if gated else x_m[:, :, i]))
            group_loss = group_loss + terms["kl_branch_T2"][i]
        if gated:
            terms["ce_gated_ensemble"] = cross_entropy(x_m, y)
            true_loss = true_loss + terms["ce_gated_ensemble"]
    total = true_loss + alpha * w * group_loss
    terms.update(logged_train_true_loss=true_loss, logged_train_group_loss=group_loss, total_loss=total)
    return total, terms


def dml_loss(out, y, T=3.0, kind="KL", pairwise=False):
    """Default ("ensemble first"): L = sum_j CE(z_j) + sum_j KL_T(z_j; sum_{k != j} z_k / (m - 1)).
    --type (pairwise):          L = sum_j CE(z_j) + sum_j sum_{k != j} KL_T(z_j; z_k) / (m - 1).  No ramp, no alpha."""
    pro = at_least_fp32(out["pro"])
    m, dis = pro.size(-1), distill(kind, T)
    ce = [cross_entropy(pro[:, :, j], y) for j in range(m)]
    total = ce[0]
    for j in range(1, m):
        total = total + ce[j]
    kl = []
    for j in range(m):
        if pairwise:
            kl_j = 0
            for k in range(m):
                if k != j:
                    piece = 1 / (m - 1) * dis(pro[:, :, j], pro[:, :, k])
                    total, kl_j = total + piece, kl_j + piece
        else:
            others = 0
            for k in range(m):
                if k != j:
                    others = others + pro[:, :, k]
            kl_j = dis(pro[:, :, j], others / (m - 1))
            total = total + kl_j
        kl.append(kl_j)
    true_loss, group_loss = sum(ce), sum(kl)
    return total, {"ce": ce, "kl_T2": kl, "logged_train_true_loss": true_loss, "logged_train_group_loss": group_loss,
                   "total_loss": total}


def kd_loss(student, teacher, y, alpha=1.0, T=3.0, kind="KL"):
    """L = CE(z_s) + alpha KL_T(z_s; z_t), z_t from the frozen teacher (computed under no_grad by the caller)."""
    ce = cross_entropy(student, y)
    kd = distill(kind, T)(student, teacher)
    total = ce + alpha * kd
    return total, {"logged_train_true_loss": ce, "logged_train_teacher_loss": kd, "total_loss": total}
