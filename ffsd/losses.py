"""FFSD's loss terms as small pure functions. Maps are (B, C, H, W); every target is detached by the caller or here.

Notation: A(F) = mean_c F^2 (the attention map), n(v) = v / max(||v||_2, 1e-12) per sample.

Every term computes in at least float32 (common.fast.at_least_fp32): under bf16 autocast (--amp bf16) the networks'
outputs arrive in bf16, where squares, norms, softmaxes and KL lose too much; float32 (the default path) passes
unchanged and float64 stays float64 (the parity checker runs everything in float64 too). The terms are formed in
the released order of operations, so that a float32 step rounds as the authors' does.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from common.fast import at_least_fp32


def attention(feature_map):
    # A(F) = mean over channels of F^2, shape (B, 1, H, W)
    return at_least_fp32(feature_map).pow(2).mean(1, keepdim=True)


def normalized_distance(x, y):
    # Dist(x, y) = mean over B*N of (n(x) - n(y))^2, each sample flattened to N values
    b = x.size(0)
    x, y = at_least_fp32(x).reshape(b, -1), at_least_fp32(y).reshape(b, -1)
    return (F.normalize(x, dim=1) - F.normalize(y, dim=1)).pow(2).mean()


def attention_distance(x, y):
    # Dist(A(x), A(y)); y is the target
    return normalized_distance(attention(x), attention(y).detach())


def kl_to_teacher(student_logits, teacher_logits, temperature):
    # KL(softmax(z_t / T) || softmax(z_s / T)), batch mean, teacher detached
    t = temperature
    return F.kl_div(F.log_softmax(at_least_fp32(student_logits) / t, dim=1),
                    F.softmax(at_least_fp32(teacher_logits.detach()) / t, dim=1), reduction="batchmean")


def kd_kl(student_logits, teacher_logits, temperature):
    # T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), batch mean, teacher detached
    return temperature ** 2 * kl_to_teacher(student_logits, teacher_logits, temperature)


def dml_loss(student_logits, peer_logits, temperature):
    # T^2 * sum_j KL(softmax(z_j / T) || softmax(z_i / T)) / (M - 1) over the M - 1 peers j, each detached
    kl_sum = sum(kl_to_teacher(student_logits, z, temperature) for z in peer_logits)
    return temperature ** 2 * kl_sum / len(peer_logits)


def shifted_attention(reference_attention, normalize_target=False):
    """The attention-shifting target t of a reference attention map a (detached).

    With a_raw = a flattened, nu = ||a_raw|| (the raw norm), a_hat = n(a_raw) and tau its k-th smallest entry
    (k = floor(N/3)): t = (nu/2 - a_hat) * sign(a_hat - tau) + nu/2, i.e. nu - a_hat above tau, a_hat below it.
    Returns (t, a_hat, nu). normalize_target=True divides t by nu so it is on the unit scale of n(x) (not released).
    """
    b = reference_attention.size(0)
    a_raw = reference_attention.detach().reshape(b, -1)
    nu = a_raw.norm(dim=1, keepdim=True)
    a_hat = F.normalize(a_raw, dim=1)
    k = a_raw.size(1) // 3
    tau = a_hat.topk(k, dim=1, largest=False).values[:, -1:]
    t = (nu / 2 - a_hat) * torch.sign(a_hat - tau) + nu / 2
    if normalize_target:
        t = t / nu
    return t, a_hat, nu


def diversity_loss(feature_map, reference_map, normalize_target=False):
    # mean over B*N of (n(A(F_i)) - t(A(F_{i-1})))^2: push student i's attention away from student i-1's
    b = feature_map.size(0)
    target, _, _ = shifted_attention(attention(reference_map.detach()), normalize_target)
    return (F.normalize(attention(feature_map).reshape(b, -1), dim=1) - target).pow(2).mean()


def diversity_target(reference_map):
    # F + (t - a_hat) * nu / C, broadcast over the C channels: the predecessor's map with its attention shifted
    f = reference_map.detach()
    b, c, h, w = f.shape
    t, a_hat, nu = shifted_attention(attention(f))
    return f + ((t - a_hat) * nu / c).reshape(b, 1, h, w)


def self_distillation_loss(decoder, feature_maps, decoder_input, autocast=contextlib.nullcontext):
    """sum_l Dist(A(F^l), A(R_l)) with R the decoder's outputs (eval-mode BN, no gradient to the decoder) on
    DECODER_INPUT, reversed so the shallowest map comes first; F^l are the network's maps except the last.
    AUTOCAST() is the context the decoder's forward runs in (bf16 autocast on the fast path)."""
    decoder.eval()
    with torch.no_grad(), autocast():
        rebuilt = decoder(decoder_input.detach())[::-1]
    return sum(normalized_distance(attention(f), attention(r)) for f, r in zip(feature_maps, rebuilt))


def decoder_training_losses(decoder, feature_maps, weight, autocast=contextlib.nullcontext):
    """The decoder's own losses (train-mode BN) on its network's maps:
    feature = sum_l WEIGHT * Dist(R_l, F^l) on raw maps, attention = sum_l WEIGHT * Dist(A(R_l), A(F^l)), targets
    detached, weighted stage by stage as released. Returns (feature, attention, feature_raw, attention_raw); the raw
    sums (without WEIGHT) are detached, for the log."""
    decoder.train()
    with autocast():
        rebuilt = decoder(feature_maps[-1].detach())[::-1]
    feature = attn = feature_raw = attn_raw = 0.0
    for f, r in zip(feature_maps, rebuilt):
        rebuilt_attention, target_attention = attention(r), attention(f.detach())
        feature_term = normalized_distance(r, f.detach())
        feature = feature + weight * feature_term
        attention_term = normalized_distance(rebuilt_attention, target_attention)
        attn = attn + weight * attention_term
        feature_raw = feature_raw + feature_term.detach()
        attn_raw = attn_raw + attention_term.detach()
    return feature, attn, feature_raw, attn_raw


def lambda_warmup(value, epoch, warmup_epochs=5):
    # lambda(e) = lambda * exp(-5 (1 - e/5)^2) for e <= 5, lambda afterwards
    if epoch > warmup_epochs:
        return value
    return value * math.exp(-5 * (1 - epoch / warmup_epochs) ** 2)
