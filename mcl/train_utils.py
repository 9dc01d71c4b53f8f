"""Small pieces the four scripts share: the authors' lr rule, head names for the logs, evaluation, flag checks."""
import math

import torch
import torch.nn.functional as F

from common.meters import AccuracyMeter, AverageMeter

# The authors' CIFAR-100 normalisation (its digits differ from common.data's CIFAR100_MEAN/STD)
LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def lr_at_epoch(args, epoch):
    """adjust_lr of the authors: epoch-wise cosine from init_lr, or x0.1 at every milestone; other types give 0."""
    if args.lr_type == "cosine":
        return args.init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    if args.lr_type == "multistep":
        return args.init_lr * 0.1 ** sum(epoch >= m for m in args.milestones)
    return 0.0


def set_lr(optimizers, lr):
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def head_names(number_net, number_stage):
    """Log names of every head: net1/aux1, net1/aux2, ..., net1 (the deployed head), net2/aux1, ..."""
    return [[f"net{i + 1}/aux{j + 1}" if j < number_stage - 1 else f"net{i + 1}" for j in range(number_stage)]
            for i in range(number_net)]


@torch.no_grad()
def evaluate_pair(pair, loader, device, eval_batches=0, progress=lambda it, **kw: it):
    """Eval-mode test of every head: per-head CE and top-1/top-5 (percent), the authors' test loss (sum of the head
    CEs), and per network the maximum top-1 over its heads (what the released logs report)."""
    pair.eval()
    loss_meter, head_loss, head_acc = AverageMeter(), None, None
    total = min(len(loader), eval_batches) if eval_batches else len(loader)
    for i, (x, y) in enumerate(progress(loader, desc="test", total=total)):
        if eval_batches and i >= eval_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _, logits = pair(x)
        if head_loss is None:
            head_loss = [[AverageMeter() for _ in net] for net in logits]
            head_acc = [[AccuracyMeter() for _ in net] for net in logits]
        losses = [[F.cross_entropy(z, y) for z in net] for net in logits]
        loss_meter.update(sum(sum(row) for row in losses).item(), x.size(0))
        for i_net, net in enumerate(logits):
            for j, z in enumerate(net):
                head_loss[i_net][j].update(losses[i_net][j].item(), x.size(0))
                head_acc[i_net][j].update(z, y)
    names = head_names(len(head_acc), len(head_acc[0]))
    record = {"test/loss": loss_meter.avg}
    for i_net, row in enumerate(head_acc):
        for j, meter in enumerate(row):
            acc = meter.per_sample()
            record[f"test/{names[i_net][j]}/loss"] = head_loss[i_net][j].avg
            record[f"test/{names[i_net][j]}/top1"] = acc[1]
            record[f"test/{names[i_net][j]}/top5"] = acc[5]
        record[f"test/net{i_net + 1}/max_heads/top1"] = max(m.per_sample()[1] for m in row)
    record["test/max_heads/top1"] = max(record[f"test/net{i + 1}/max_heads/top1"] for i in range(len(head_acc)))
    return record


@torch.no_grad()
def evaluate_single(model, loader, device, eval_batches=0, progress=lambda it, **kw: it, name="net"):
    model.eval()
    loss_meter, acc = AverageMeter(), AccuracyMeter()
    total = min(len(loader), eval_batches) if eval_batches else len(loader)
    for i, (x, y) in enumerate(progress(loader, desc="test", total=total)):
        if eval_batches and i >= eval_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _, logits = model(x)
        loss_meter.update(F.cross_entropy(logits, y).item(), x.size(0))
        acc.update(logits, y)
    top = acc.per_sample()
    return {f"test/{name}/loss": loss_meter.avg, f"test/{name}/top1": top[1], f"test/{name}/top5": top[5]}


def check_positive(parser, args, names):
    for name in names:
        value = getattr(args, name)
        if value is None or value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
