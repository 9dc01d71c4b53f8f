"""Small pieces the scripts share: the authors' lr rule, head names for the logs, evaluation, flag checks, and the
data/evaluation plumbing of the two ImageNet scripts (torchrun)."""
import contextlib
import math

import torch
import torch.nn.functional as F

from common.fast import at_least_fp32
from common.meters import AccuracyMeter

# The authors' CIFAR-100 normalisation (its digits differ from common.data's CIFAR100_MEAN/STD)
LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def build_as_released(make_model, probe_shape):
    """MAKE_MODEL() drawn from the seeded RNG as the authors' CIFAR scripts draw it: built once for their parameter /
    FLOP log line and discarded, built again (the model that is trained), then their torch.randn width probe of
    PROBE_SHAPE, on the CPU. Returns (model, probe); every later seeded draw (loss-side modules, augmentation) is then
    the authors' too (tests/test_mcl.py checks the shipped fixture's weights bit for bit)."""
    make_model()
    model = make_model()
    return model, torch.randn(probe_shape)


def lr_at_epoch(args, epoch):
    """adjust_lr of the authors: epoch-wise cosine from init_lr, or x0.1 at every milestone; other types give 0."""
    if args.lr_type == "cosine":
        return args.init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    if args.lr_type == "multistep":
        return args.init_lr * 0.1 ** sum(epoch >= m for m in args.milestones)
    return 0.0


def baseline_step(model, optimizer, x, y, autocast=contextlib.nullcontext):
    """One iteration of a network trained alone with CE (forward under AUTOCAST(), the CE in float32). Returns the
    loss and the logits."""
    with autocast():
        _, logits = model(x)
    loss = F.cross_entropy(at_least_fp32(logits), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss, logits


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
    CEs), and per network the maximum top-1 over its heads (what the released logs report). The CE sums stay on the
    device in float64 (the same bits as summing .item() x batch size) and are read once at the end."""
    pair.eval()
    loss_sums, head_acc, samples = None, None, 0  # loss_sums: [test loss, every head's CE] x batch size
    total = min(len(loader), eval_batches) if eval_batches else len(loader)
    for i, (x, y) in enumerate(progress(loader, desc="test", total=total)):
        if eval_batches and i >= eval_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _, logits = pair(x)
        if head_acc is None:
            head_acc = [[AccuracyMeter() for _ in net] for net in logits]
        losses = [[F.cross_entropy(z, y) for z in net] for net in logits]
        batch = torch.stack([sum(sum(row) for row in losses)] + [ce for row in losses for ce in row]).double()
        loss_sums = batch * x.size(0) if loss_sums is None else loss_sums + batch * x.size(0)
        samples += x.size(0)
        for i_net, net in enumerate(logits):
            for j, z in enumerate(net):
                head_acc[i_net][j].update(z, y)
    names = head_names(len(head_acc), len(head_acc[0]))
    means = iter(v / max(samples, 1) for v in loss_sums.tolist())
    record = {"test/loss": next(means)}
    for i_net, row in enumerate(head_acc):
        for j, meter in enumerate(row):
            acc = meter.per_sample()
            record[f"test/{names[i_net][j]}/loss"] = next(means)  # heads in the order they were stacked
            record[f"test/{names[i_net][j]}/top1"] = acc[1]
            record[f"test/{names[i_net][j]}/top5"] = acc[5]
        record[f"test/net{i_net + 1}/max_heads/top1"] = max(m.per_sample()[1] for m in row)
    record["test/max_heads/top1"] = max(record[f"test/net{i + 1}/max_heads/top1"] for i in range(len(head_acc)))
    return record


@torch.no_grad()
def evaluate_single(model, loader, device, eval_batches=0, progress=lambda it, **kw: it, name="net"):
    """evaluate_pair for one network: CE (summed on the device in float64, read once) and top-1/top-5."""
    model.eval()
    loss_sum, samples, acc = torch.zeros((), dtype=torch.float64, device=device), 0, AccuracyMeter()
    total = min(len(loader), eval_batches) if eval_batches else len(loader)
    for i, (x, y) in enumerate(progress(loader, desc="test", total=total)):
        if eval_batches and i >= eval_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _, logits = model(x)
        loss_sum += F.cross_entropy(logits, y).double() * x.size(0)
        samples += x.size(0)
        acc.update(logits, y)
    top = acc.per_sample()
    return {f"test/{name}/loss": loss_sum.item() / max(samples, 1), f"test/{name}/top1": top[1],
            f"test/{name}/top5": top[5]}


def check_positive(parser, args, names):
    for name in names:
        value = getattr(args, name)
        if value is None or value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")


# ---- ImageNet scripts (torchrun / DDP; also one plain process) ----

def imagenet_data(args, ctx, wrap_train=None):
    """Train/val ImageFolders and loaders. The train loader gets this process's share of the published global
    batch (DistributedSampler, call set_epoch every epoch); the val set is split into disjoint strided parts
    (exact: no sample is repeated, the counts are all-reduced). --image-size shrinks the crops for smoke runs."""
    from torch.utils.data import Subset

    from common.data import imagenet_datasets, imagenet_train_transform, imagenet_val_transform, make_loader
    from common.distributed import per_process_batch, train_sampler
    resize = round(args.image_size * 256 / 224)
    train_set, val_set = imagenet_datasets(args.data_root, imagenet_train_transform(size=args.image_size),
                                           imagenet_val_transform(size=args.image_size, resize=resize))
    train_data = wrap_train(train_set) if wrap_train else train_set
    batch = per_process_batch(args.batch_size, ctx)
    sampler = train_sampler(train_data, ctx, shuffle=True, seed=args.manual_seed)
    pin = ctx.device.type == "cuda"
    train_loader = make_loader(train_data, batch, shuffle=sampler is None, sampler=sampler, workers=args.num_workers,
                               pin_memory=pin)
    val_part = Subset(val_set, range(ctx.rank, len(val_set), ctx.world_size))
    val_loader = make_loader(val_part, batch, workers=args.num_workers, pin_memory=pin)
    return train_set, train_loader, val_loader


def seed_epoch(seed, rank, epoch):
    """Data randomness (crops, flips, contrast indices) as a function of (seed, process, epoch): every process
    draws its own, and a resumed run redraws exactly what it would have drawn."""
    import numpy as np
    value = (seed * 1_000_003 + epoch * 1009 + rank) % 2**31
    torch.manual_seed(value)
    np.random.seed(value)


def sync_buffers(module, ctx):
    """Rank 0's BatchNorm statistics everywhere (DDP broadcasts them at every forward; forwards outside DDP, such
    as the meta step's extra one, leave each process its own)."""
    if ctx.distributed:
        for b in module.buffers():
            torch.distributed.broadcast(b, 0)


def reduce_sums(values, ctx):
    """All-reduce sums and counts (a list of floats or a device tensor) in float64; returns a list of floats. The one
    host sync of a training loop that keeps its sums on the device."""
    from common.distributed import all_reduce_sum
    return all_reduce_sum(torch.as_tensor(values, dtype=torch.float64, device=ctx.device), ctx).tolist()


@torch.no_grad()
def evaluate_heads(model, loader, ctx, eval_batches=0, progress=lambda it, **kw: it, single=False):
    """evaluate_pair / evaluate_single over processes: per-head CE sums and top-1/top-5 counts are all-reduced, so
    every process returns the numbers of the whole val set. `single`: a baseline network (key `net`)."""
    from common.meters import topk_correct
    model.eval()
    sums, samples, shape = None, 0, None  # sums: per head [CE sum, top-1 count, top-5 count]
    total = min(len(loader), eval_batches) if eval_batches else len(loader)
    for i, (x, y) in enumerate(progress(loader, desc="test", total=total)):
        if eval_batches and i >= eval_batches:
            break
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        logits = [[model(x)[1]]] if single else model(x)[1]
        batch = torch.stack([torch.cat([F.cross_entropy(z, y, reduction="sum").view(1), topk_correct(z, y)])
                             for net in logits for z in net]).double()
        sums = batch if sums is None else sums + batch
        shape, samples = [len(net) for net in logits], samples + y.size(0)
    flat = reduce_sums(sums.flatten().tolist() + [samples], ctx)
    samples = max(flat.pop(), 1)
    per_head = [flat[3 * h:3 * h + 3] for h in range(len(flat) // 3)]
    if single:
        loss, top1, top5 = per_head[0]
        return {"test/net/loss": loss / samples, "test/net/top1": 100 * top1 / samples,
                "test/net/top5": 100 * top5 / samples}
    names = head_names(len(shape), shape[0])
    record = {"test/loss": sum(h[0] for h in per_head) / samples}
    h = 0
    for i_net, row in enumerate(names):
        for name in row:
            loss, top1, top5 = per_head[h]
            record.update({f"test/{name}/loss": loss / samples, f"test/{name}/top1": 100 * top1 / samples,
                           f"test/{name}/top5": 100 * top5 / samples})
            h += 1
        record[f"test/net{i_net + 1}/max_heads/top1"] = max(record[f"test/{n}/top1"] for n in row)
    record["test/max_heads/top1"] = max(record[f"test/net{i + 1}/max_heads/top1"] for i in range(len(names)))
    return record


def add_imagenet_args(p):
    """Options both ImageNet scripts share beyond the authors' (launcher flags are accepted and ignored)."""
    p.add_argument("--image-size", type=int, default=224,
                   help="train crop and val centre crop (val resize = size * 256/224); smaller only for smoke runs")
    for flag in ("--world-size", "--rank", "--dist-url", "--dist-backend", "--local_rank", "--local-rank",
                 "--master_addr", "--master_port"):
        p.add_argument(flag, default=None, help="accepted for compatibility; torchrun's environment is used")
    p.add_argument("--multiprocessing-distributed", action="store_true",
                   help="accepted for compatibility; launch with torchrun --nproc_per_node N instead")
