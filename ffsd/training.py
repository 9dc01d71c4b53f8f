"""The FFSD training step and the test metrics, shared by cifar.py and imagenet.py (and the parity checker).

Networks (M common students, the leader, the fusion module, one decoder per follower student and one for the
leader) are separate modules with separate optimizers; every cross-network signal is detached, so nothing flows
back into the common students from the fusion module or the leader.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.distributed import unwrap
from common.fast import at_least_fp32
from common.meters import topk_accuracy

from ffsd.losses import attention_distance, decoder_training_losses, diversity_loss, diversity_target, dml_loss, \
    kd_kl, lambda_warmup, self_distillation_loss
from ffsd.models import create_decoder, create_fusion_module, create_model


class FFSDNetworks(nn.Module):
    """students[i]; leader; fusion_module; sd_students[i - 1] (decoder of follower i >= 1); sd_leader."""

    def __init__(self, students, leader, fusion_module, sd_students, sd_leader):
        super().__init__()
        self.students = nn.ModuleList(students)
        self.leader = leader
        self.fusion_module = fusion_module
        self.sd_students = nn.ModuleList(sd_students)
        self.sd_leader = sd_leader

    @property
    def model_num(self):
        return len(self.students)

    def named_networks(self):
        """The six (for M = 2) networks under the names the fixtures and checkpoints use, in construction order."""
        named = {f"student{i}": s for i, s in enumerate(self.students)}
        named.update({f"sd_student{i + 1}": d for i, d in enumerate(self.sd_students)})
        named.update({"sd_leader": self.sd_leader, "fusion_module": self.fusion_module, "leader": self.leader})
        return named

    def wrapped(self, fn):
        """FFSDNetworks holding FN(network) in place of every network (prepared for the fast path, DDP-wrapped)."""
        return FFSDNetworks([fn(s) for s in self.students], fn(self.leader), fn(self.fusion_module),
                            [fn(d) for d in self.sd_students], fn(self.sd_leader))


def build_networks(model, dataset="cifar100", model_num=2, probe_size=32):
    """All networks, in the released construction order (it fixes the RNG stream under a seed): the students, the
    noise probe through student 0 (train mode: it moves student 0's BN running statistics and draws from the RNG),
    the follower decoders, the leader's decoder, the fusion module, the leader."""
    if model_num < 2:
        raise ValueError(f"--model_num must be at least 2 (the students distil from each other); got {model_num}")
    students = [create_model(model, dataset, leader=False, model_num=model_num) for _ in range(model_num)]
    students[0].train()
    with torch.no_grad():
        _, maps = students[0](torch.randn(1, 3, probe_size, probe_size))
    sd_students = [create_decoder(model, students[i], len(maps)) for i in range(1, model_num)]
    sd_leader = create_decoder(model, students[0], len(maps))
    fusion_module = create_fusion_module(students[0], dataset, model_num)
    leader = create_model(model, dataset, leader=True, model_num=model_num)
    return FFSDNetworks(students, leader, fusion_module, sd_students, sd_leader)


def prepare_networks(nets, fast):
    """The networks to call on the fast path: channels_last and/or torch.compile (common.fast.Fast.prepare). NETS
    keeps the plain modules (their state dicts are what checkpoints hold); without either option this is NETS."""
    if not (fast.channels_last or fast.compile):
        return nets
    return nets.wrapped(fast.prepare)


FUSION_WEIGHT_DECAY = 1e-5  # the fusion module's SGD weight decay, hard-coded in the released trainers


def build_optimizers(nets, lr=0.1, momentum=0.9, weight_decay=1e-4):
    """The scripts' six optimizers (M = 2), by network name: Nesterov SGD for the students and the leader (weight decay
    WEIGHT_DECAY) and for the fusion module (FUSION_WEIGHT_DECAY); Adam with its default lr 1e-3 and coupled L2 weight
    decay WEIGHT_DECAY for the decoders. One parameter group each: BN weights and biases decay too, as released."""
    def sgd(module, wd):
        return torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=wd, nesterov=True)

    def adam(module):
        return torch.optim.Adam(module.parameters(), lr=1e-3, weight_decay=weight_decay)

    optimizers = {f"student{i}": sgd(s, weight_decay) for i, s in enumerate(nets.students)}
    optimizers.update({f"sd_student{i + 1}": adam(d) for i, d in enumerate(nets.sd_students)})
    optimizers.update({"sd_leader": adam(nets.sd_leader), "fusion_module": sgd(nets.fusion_module, FUSION_WEIGHT_DECAY),
                       "leader": sgd(nets.leader, weight_decay)})
    return optimizers


def build_schedulers(optimizers, args, dataset="cifar100"):
    """The scripts' per-epoch schedulers (stepped after each epoch's test): on CIFAR every optimizer, on ImageNet only
    the decoders' Adams (the SGD lr is set every iteration, imagenet_lr). --lr_policy step: MultiStepLR(lr_decay_iters,
    lr_decay_gamma); cosine: CosineAnnealingLR(n_epochs). With --fast_forward_schedulers they are stepped to
    --start_epoch (released: a later start epoch still begins at --lr)."""
    scheduled = optimizers if dataset == "cifar100" else {k: o for k, o in optimizers.items() if k.startswith("sd_")}
    if args.lr_policy == "step":
        schedulers = {k: torch.optim.lr_scheduler.MultiStepLR(o, args.lr_decay_iters, args.lr_decay_gamma)
                      for k, o in scheduled.items()}
    else:
        schedulers = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=args.n_epochs, eta_min=0)
                      for k, o in scheduled.items()}
    if args.fast_forward_schedulers:
        for _ in range(args.start_epoch - 1):
            for s in schedulers.values():
                s.step()
    return schedulers


def imagenet_lr(base_lr, epoch, step, iterations_per_epoch, warmup="released"):
    """The released ImageNet SGD lr, set before every iteration: 0.1^(floor(e/30) + [e >= 80]) times a linear warm-up
    (1 + s + w * n) / (5 n) while w < 5, with n iterations per epoch and w = e (released: epochs start at 1, so the
    ramp covers epochs 1-4 and starts near 0.2x) or, with warmup='five_epochs', w = e - 1 (epochs 1-5, from 0)."""
    w = epoch - 1 if warmup == "five_epochs" else epoch
    lr = base_lr * 0.1 ** (epoch // 30 + int(epoch >= 80))
    if w < 5:
        lr *= (1 + step + w * iterations_per_epoch) / (5 * iterations_per_epoch)
    return lr


def set_sgd_lr(optimizers, lr):
    """The lr of every SGD optimizer (students, leader, fusion module); the decoders' Adams keep their schedulers."""
    for name, optimizer in optimizers.items():
        if not name.startswith("sd_"):
            for group in optimizer.param_groups:
                group["lr"] = lr


def warmed_up_lambdas(opt_lambdas, epoch):
    """The three lambdas after the exponential warm-up over epochs 1-5."""
    return {name: lambda_warmup(value, epoch) for name, value in opt_lambdas.items()}


def epoch_lambdas(args, epoch):
    """The warmed-up {'diversity', 'fusion', 'self_distillation'} of EPOCH from the script's --lambda_* options."""
    return warmed_up_lambdas({"diversity": args.lambda_diversity, "fusion": args.lambda_fusion,
                              "self_distillation": args.lambda_self_distillation}, epoch)


def _step(optimizer, loss):
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def forward_networks(forward, inputs):
    """The iteration's forwards, all at the pre-update weights: the leader, the students, then the fusion module on
    the students' detached last maps (each BN layer sees one train-mode forward)."""
    leader_logits, leader_maps, trans_fusion = forward.leader(inputs)
    student_logits, student_maps = [], []
    for student in forward.students:
        logits, maps = student(inputs)
        student_logits.append(logits)
        student_maps.append(maps)
    fusion_input = torch.cat([maps[-1].detach() for maps in student_maps], 1)
    fusion_logits, fused = forward.fusion_module(fusion_input)
    return leader_logits, leader_maps, trans_fusion, student_logits, student_maps, fusion_input, fusion_logits, fused


def train_step(nets, optimizers, inputs, labels, lambdas, temperature=2, follower_sd_weight="diversity",
               normalized_diversity_target=False, forward=None, autocast=contextlib.nullcontext):
    """One FFSD iteration in the released order. LAMBDAS: warmed-up {'diversity', 'fusion', 'self_distillation'}.

    follower_sd_weight: which lambda weighs the follower students' self-distillation term ('diversity' as
    released, or 'self_distillation'). FORWARD: the networks to call (DDP-wrapped, channels_last, compiled),
    defaulting to NETS; decoders producing targets are called without DDP and without gradient, since nothing flows
    into them. AUTOCAST(): the context of every network forward (bf16 autocast on the fast path); the loss terms
    compute in at least float32 (float64 networks give float64 terms). Every loss is formed and summed in the
    released order, which fixes the float32 rounding. No host synchronisation: every term stays a device tensor.
    Returns (terms, outputs): detached loss terms by name and the forward outputs."""
    forward = forward or nets
    m = nets.model_num
    t = temperature

    def ce(logits, targets):
        return F.cross_entropy(at_least_fp32(logits), targets)
    lam_div, lam_fusion, lam_sd = lambdas["diversity"], lambdas["fusion"], lambdas["self_distillation"]
    lam_follower_sd = lambdas[follower_sd_weight]

    with autocast():
        (leader_logits, leader_maps, trans_fusion, student_logits, student_maps, fusion_input, fusion_logits,
         fused) = forward_networks(forward, inputs)
    mean_logits = sum(at_least_fp32(z) for z in student_logits) / m

    terms = {}
    for i in range(m):  # common students: CE + DML (+ diversity and self-distillation for followers)
        z = student_logits[i]
        loss_ce = ce(z, labels)
        dml = dml_loss(z, [student_logits[j] for j in range(m) if j != i], t)
        loss = loss_ce + dml
        terms.update({f"student{i}/ce": loss_ce, f"student{i}/dml": dml})
        if i >= 1:
            previous_last = student_maps[i - 1][-1].detach()
            div_raw = diversity_loss(student_maps[i][-1], previous_last, normalized_diversity_target)
            diversity = lam_div * div_raw
            with torch.no_grad():
                shifted = diversity_target(previous_last)
            sd_raw = self_distillation_loss(unwrap(forward.sd_students[i - 1]), student_maps[i][:-1], shifted,
                                            autocast)
            self_distillation = lam_follower_sd * sd_raw
            loss = loss + diversity + self_distillation
            terms.update({f"student{i}/diversity_raw": div_raw, f"student{i}/diversity": diversity,
                          f"student{i}/self_distillation_raw": sd_raw,
                          f"student{i}/self_distillation": self_distillation})
        terms[f"student{i}/total"] = loss
        _step(optimizers[f"student{i}"], loss)

    # Fusion module: CE + KL to the students' mean logits.
    fusion_ce, fusion_kl = ce(fusion_logits, labels), kd_kl(fusion_logits, mean_logits, t)
    fusion_loss = fusion_ce + fusion_kl
    terms.update({"fusion/ce": fusion_ce, "fusion/kl": fusion_kl, "fusion/total": fusion_loss})
    _step(optimizers["fusion_module"], fusion_loss)

    # Leader: CE + KL to the fusion logits + lambda_fusion * (attention to the fused map, TransFusion attention to
    # the concatenated student maps, self-distillation from the fused map), all targets detached.
    fused = fused.detach()
    leader_ce, leader_kl = ce(leader_logits, labels), kd_kl(leader_logits, fusion_logits, t)
    fusion_raw = attention_distance(leader_maps[-1], fused)
    leader_fusion = lam_fusion * fusion_raw
    trans_raw = attention_distance(trans_fusion, fusion_input)
    leader_trans = lam_fusion * trans_raw
    leader_sd_raw = self_distillation_loss(unwrap(forward.sd_leader), leader_maps[:-1], fused, autocast)
    leader_sd = lam_fusion * leader_sd_raw
    leader_loss = leader_ce + leader_kl + leader_fusion + leader_trans + leader_sd
    terms.update({"leader/ce": leader_ce, "leader/kl": leader_kl, "leader/fusion_raw": fusion_raw,
                  "leader/fusion": leader_fusion, "leader/trans_fusion_raw": trans_raw,
                  "leader/trans_fusion": leader_trans, "leader/self_distillation_raw": leader_sd_raw,
                  "leader/self_distillation": leader_sd, "leader/total": leader_loss})
    _step(optimizers["leader"], leader_loss)

    # Decoders: each fits its own network's maps (train-mode BN), weighted by lambda_self_distillation.
    decoders = [(f"sd_student{i}", forward.sd_students[i - 1], student_maps[i]) for i in range(1, m)]
    decoders.append(("sd_leader", forward.sd_leader, leader_maps))
    for name, decoder, maps in decoders:
        feature, attn, feature_raw, attn_raw = decoder_training_losses(decoder, maps, lam_sd, autocast)
        terms.update({f"{name}/feature_raw": feature_raw, f"{name}/attention_raw": attn_raw,
                      f"{name}/feature": feature, f"{name}/attention": attn})
        _step(optimizers[name], feature + attn)

    terms = {k: v.detach() for k, v in terms.items()}
    outputs = {"student_logits": [z.detach() for z in student_logits], "leader_logits": leader_logits.detach(),
               "fusion_logits": fusion_logits.detach(), "trans_fusion": trans_fusion.detach(),
               "student_maps": [[f.detach() for f in maps] for maps in student_maps],
               "leader_maps": [f.detach() for f in leader_maps], "fused": fused}
    return terms, outputs


@torch.no_grad()
def predict(nets, inputs):
    """Eval-mode logits of every network: {'student<i>': ..., 'fusion': ..., 'leader': ...}."""
    logits = {}
    last_maps = []
    for i, student in enumerate(nets.students):
        z, maps = student(inputs)
        logits[f"student{i}"] = z
        last_maps.append(maps[-1])
    logits["fusion"] = nets.fusion_module(torch.cat(last_maps, 1))[0]
    logits["leader"] = nets.leader(inputs)[0]
    return logits


def batch_accuracies(logits, labels):
    """Top-1 hits (percent, as tensors) of every network, the students' average and the oracle ensemble."""
    hits = {name: z.argmax(1).eq(labels) for name, z in logits.items()}
    students = [h for name, h in hits.items() if name.startswith("student")]
    acc = {f"{name}/top1": 100.0 * h.float().mean() for name, h in hits.items()}
    acc["average/top1"] = sum(acc[f"{name}/top1"] for name in hits if name.startswith("student")) / len(students)
    acc["ensemble_oracle/top1"] = 100.0 * torch.stack(students).any(0).float().mean()
    return acc


def test_metrics(logits, labels):
    """One test batch's values for common.loop.evaluate, whose per-sample means over the test set are logged: top-1,
    top-5 and CE of every network and of a real ensemble (mean of the students' logits), the students' average
    top-1, and the released 'Ensemble Acc' (oracle: a sample counts when ANY student is right). LOGITS: predict()."""
    logits = {name: at_least_fp32(z) for name, z in logits.items()}
    students = [z for name, z in logits.items() if name.startswith("student")]
    logits["ensemble"] = torch.stack(students).mean(0)
    values = {}
    for name, z in logits.items():
        values.update(topk_accuracy(z, labels, (1, 5), f"{name}/"))
        values[f"{name}/loss"] = F.cross_entropy(z, labels)
    hits = torch.stack([z.argmax(1).eq(labels) for z in students])
    values["ensemble_oracle/top1"] = 100.0 * hits.any(0).double().mean()
    values["average/top1"] = 100.0 * hits.double().mean()
    return values
