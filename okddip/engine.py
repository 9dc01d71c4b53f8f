"""What the five training scripts share: the released recipe (flags, data, Nesterov SGD, the torch-1.0.1 aligned
step schedule, per-epoch ramp), the epoch loop on the repository's run-directory contract, evaluation, and the
authors' output files. Each script supplies its model and a `step(model, x, y, epoch) -> (loss, terms, out)`.

Per epoch e (0-based): lr = lr0 * 0.1^(number of milestones <= e)  (what the released code got under torch 1.0.1),
ramp weight w(e) (OKDDip, ONE, CL-ILR), one pass over the training set, evaluation on the whole test set, then
log.jsonl, checkpoint.pt, last.pth / best.pth / test_best_metrics.json.
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch

from common import distributed as dist
from common.checkpoint import CHECKPOINT_NAME, ResumableEpoch, load_checkpoint, save_checkpoint
from common.data import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, cifar_datasets, cifar_test_transform,
                         cifar_train_transform, imagenet_datasets, imagenet_train_transform, imagenet_val_transform,
                         make_loader)
from common.fast import DeviceCifarLoader, add_fast_args, at_least_fp32, prepare_model, resolve_fast_args
from common.logging import FiniteGuard, RunLogger, add_common_args
from common.meters import AccuracyMeter, Timer
from okddip.losses import cross_entropy
from okddip.models import check_arch
from okddip.students import diversity_dist, student_logits

DATASETS = ("CIFAR10", "CIFAR100", "imagenet")


def base_parser(description):
    """The flags every released script has (names and defaults as released) plus the repository's common ones."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet32", help="architecture (resnet32, resnet110, wide_resnet20_8, vgg16, "
                                                        "vgg19, densenetd40k12, ...; resnet34 for imagenet)")
    p.add_argument("--dataset", default="CIFAR10", choices=DATASETS)
    p.add_argument("--num_epochs", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=128, help="global batch (split over torchrun processes)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--schedule", type=int, nargs="+", default=[150, 225], help="epochs where lr is multiplied by 0.1")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay (on every parameter, as released)")
    p.add_argument("--dropout", type=float, default=0.0, help="VGG classifier dropout of the plain networks")
    p.add_argument("--efficient", action="store_true", help="accepted for compatibility; unused, as released")
    p.add_argument("--version", default="V0", help="suffix of the default output folder")
    p.add_argument("--num_workers", type=int, default=8)
    p.add_argument("--gpu_id", default="0", help="accepted for compatibility; choose the device with --device or "
                                                 "CUDA_VISIBLE_DEVICES")
    p.add_argument("--seed", type=int, default=None, help="seed torch/NumPy/random (the released code sets none)")
    add_common_args(p, data_root_default="./Data")
    add_fast_args(p)
    return p


def check_args(args):
    if args.num_epochs < 1:
        raise SystemExit(f"--num_epochs must be >= 1, got {args.num_epochs}")
    if args.batch_size < 1 or args.lr <= 0:
        raise SystemExit("--batch_size must be >= 1 and --lr > 0")
    try:
        check_arch(args.model, args.dataset)
    except ValueError as e:
        raise SystemExit(f"--model: {e}")
    resolve_fast_args(args)
    if args.seed is not None:  # before the model is built, so the initial weights follow the seed too
        import random
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        random.seed(args.seed)


def lr_at(epoch, lr, milestones):
    """lr of 0-based epoch e: lr * 0.1^(#milestones <= e) (torch 1.0.1 behaviour of the released step placement)."""
    return lr * 0.1 ** sum(1 for m in milestones if m <= epoch)


def count_classes(args):
    """10 / 100 for CIFAR; for ImageNet the number of class folders in <data-root>/train (1000 for ILSVRC-2012)."""
    if args.dataset != "imagenet":
        return 10 if args.dataset == "CIFAR10" else 100
    folder = os.path.join(args.data_root, "train")
    if not os.path.isdir(folder):
        imagenet_datasets(args.data_root, None, None)  # raises the clear DatasetNotFoundError
    return sum(os.path.isdir(os.path.join(folder, d)) for d in os.listdir(folder))


def data(args, ctx):
    """Train/test loaders as released (PIL pipeline, shuffled train, sequential test, drop_last False), or with
    --data-on-device the same semantics with CIFAR held on the device: zero padding, crop then flip, the dataset's
    normalisation, the same batch size; DDP processes draw their shards from a DistributedSampler either way."""
    batch = dist.per_process_batch(args.batch_size, ctx)
    if args.dataset == "imagenet":
        train, test = imagenet_datasets(args.data_root, imagenet_train_transform(), imagenet_val_transform())
        num_classes = len(train.classes)
    else:
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if args.dataset == "CIFAR10" else (CIFAR100_MEAN, CIFAR100_STD)
        num_classes = 10 if args.dataset == "CIFAR10" else 100
        if args.data_on_device:
            train, test = cifar_datasets(args.dataset, args.data_root, None, None)
            sampler = dist.train_sampler(train, ctx, shuffle=True, seed=args.seed or 0)
            train_loader = DeviceCifarLoader(train, batch, ctx.device, mean, std, train=True, padding_mode="constant",
                                             order="crop_flip", shuffle=True, drop_last=False, sampler=sampler,
                                             seed=args.seed or 0, channels_last=args.channels_last)
            test_loader = DeviceCifarLoader(test, batch, ctx.device, mean, std, train=False,
                                            sampler=dist.train_sampler(test, ctx, shuffle=False),
                                            channels_last=args.channels_last)
            return train_loader, test_loader, num_classes
        train, test = cifar_datasets(args.dataset, args.data_root, cifar_train_transform(mean, std, "constant",
                                                                                          "crop_flip"),
                                     cifar_test_transform(mean, std))
    pin = ctx.device.type == "cuda"
    sampler = dist.train_sampler(train, ctx, shuffle=True, seed=args.seed or 0)
    train_loader = make_loader(train, batch, shuffle=True, workers=args.num_workers, pin_memory=pin, sampler=sampler)
    test_sampler = dist.train_sampler(test, ctx, shuffle=False)
    test_loader = make_loader(test, batch, shuffle=False, workers=args.num_workers, pin_memory=pin,
                              sampler=test_sampler)
    return train_loader, test_loader, num_classes


def make_optimizer(model, args):
    """Nesterov SGD, momentum 0.9, weight decay on every parameter, one group (as released)."""
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.wd)


def set_epoch_lr(optimizer, args, epoch):
    """The lr of 0-based EPOCH (lr_at) into every parameter group; returns it."""
    lr = lr_at(epoch, args.lr, args.schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimize(net, optimizer, step, x, y, epoch):
    """One training iteration: the script's forward and loss, backward, SGD step. Nothing here waits for the device."""
    loss, terms, out = step(net, x, y, epoch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss, terms, out


class DeviceMeans:
    """Per-batch means of named scalar tensors, summed on the device in float64 (the same additions as the released
    Python-float running averages) and read once, at the epoch end: no host sync per step."""

    def __init__(self):
        self.names, self.sums, self.count = None, None, 0

    def update(self, values):
        if self.names is None:
            self.names = list(values)
        elif list(values) != self.names:
            raise ValueError(f"logged terms changed within an epoch: {list(values)} vs {self.names}")
        row = torch.stack([at_least_fp32(torch.as_tensor(v).detach()) for v in values.values()]).double()
        self.sums = row if self.sums is None else self.sums + row
        self.count += 1

    def totals(self):
        """{name: (sum, count)} as floats."""
        if self.names is None:
            return {}
        return {k: (s, self.count) for k, s in zip(self.names, self.sums.tolist())}

    def state_dict(self):
        return {"names": self.names, "sums": self.sums, "count": self.count}

    def load_state_dict(self, state):
        self.names, self.sums, self.count = state["names"], state["sums"], state["count"]


def term_tensors(terms, names):
    """Loss-term dict of okddip.losses -> flat {log name: 0-d tensor}; list entries get the students' names."""
    rename = {"total_loss": "loss", "logged_train_true_loss": "true_loss", "logged_train_group_loss": "group_loss",
              "logged_train_teacher_loss": "teacher_loss", "ce_leader": "ce/leader", "kl_leader_T2": "kl/leader",
              "ce_gated_ensemble": "ce/gated"}
    flat = {}
    for key, value in terms.items():
        if key == "consistency_weight":
            continue
        if isinstance(value, list):
            for name, v in zip(names, value):
                flat[f"{key.split('_')[0]}/{name}"] = v
        else:
            flat[rename.get(key, key)] = value
    return flat


class EpochMeters:
    """The running metrics of one training pass, as the released train() keeps them: per-batch means of every loss
    term (and OKDDip's attention), each student's top-1/top-5 per batch; `record()` gives the log entries."""

    def __init__(self, method):
        self.method, self.means, self.accs, self.images, self.individuals = method, DeviceMeans(), {}, 0, []

    def update(self, terms, out, y):
        logits, self.individuals = student_logits(self.method, out) if self.method else ({"net": out["pro"]}, ["net"])
        self.means.update(dict(term_tensors(terms, self.individuals), **attention_terms(out)))
        for name, z in logits.items():
            self.accs.setdefault(name, AccuracyMeter()).update(z, y)
        self.images += y.size(0)

    def record(self, prefix="train"):
        record = {f"{prefix}/{k}": total / n for k, (total, n) in self.means.totals().items()}
        for name, meter in self.accs.items():
            acc = meter.per_batch_mean()
            record[f"{prefix}/{name}/top1"], record[f"{prefix}/{name}/top5"] = acc[1], acc[5]
        if self.method and self.individuals:
            for k in ("top1", "top5"):
                record[f"{prefix}/mean/{k}"] = float(np.mean([record[f"{prefix}/{n}/{k}"] for n in self.individuals]))
        return record

    def state_dict(self):
        return {"means": self.means.state_dict(), "images": self.images,
                "accs": {name: dict(vars(m)) for name, m in self.accs.items()}}

    def load_state_dict(self, state):
        self.means.load_state_dict(state["means"])
        for name, meter_state in state["accs"].items():
            vars(self.accs.setdefault(name, AccuracyMeter())).update(meter_state)
        self.images = state["images"]


def attention_terms(out):
    """Batch mean of the attention matrix (alpha_ab) and of its diagonal (the weight a peer gives itself)."""
    att = out.get("attention")
    if att is None:
        return {}
    mean = att.detach().mean(0)
    terms = {f"attention/{a}{b}": mean[a, b] for a in range(mean.size(0)) for b in range(mean.size(1))}
    terms["attention_self"] = mean.diagonal().mean()
    return terms


def default_run_dir(args, sub):
    return os.path.join(args.dataset, str(args.num_epochs), sub)


def train(args, script, method, model, step, meta, select, run_dir_default, ramp=None, extra_state=None):
    """The epoch loop. `select` is the log key whose best value picks best.pth (the released criterion)."""
    ctx = dist.init_distributed(args.device)
    run_dir = args.run_dir or run_dir_default
    args.run_dir = run_dir
    train_loader, test_loader, _ = data(args, ctx)
    model = model.to(ctx.device)
    if args.channels_last:  # before DDP builds its gradient buckets
        model = model.to(memory_format=torch.channels_last)
    # the released ONE --ind leaves the gate without gradient; DDP must be told
    # `net` is what runs (DDP and/or compiled); `model` is the plain module whose state_dict is saved
    net = prepare_model(dist.wrap_ddp(model, ctx, find_unused_parameters=True), args)
    optimizer = make_optimizer(model, args)
    logger = RunLogger(run_dir, args, script=script, enabled=ctx.is_main, quiet=args.quiet, device=ctx.device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.print(f"{script}: {args.model} on {args.dataset}, Total params: {n_params / 1e6:.2f}M, run dir {run_dir}")
    ckpt_path = os.path.join(run_dir, CHECKPOINT_NAME)
    meta = dict(meta, script=script, model=args.model, dataset=args.dataset, world_size=ctx.world_size)
    start_epoch, epoch_resume, best, best_metrics = 0, None, -1.0, None
    if args.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, expect_meta=meta, restore_rng=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, epoch_resume = ckpt["epoch"], ckpt.get("epoch_state")
        if isinstance(train_loader, DeviceCifarLoader):  # its own generator: augmentation and order
            train_loader.load_state_dict((epoch_resume or ckpt)["loader"])
        best, best_metrics = ckpt["best"], ckpt.get("best_metrics")
        logger.truncate_after(start_epoch)
        logger.print(f"resumed from {ckpt_path} at epoch {start_epoch}" +
                     (f", step {epoch_resume['step']}" if epoch_resume else ""))
    guard = FiniteGuard()

    def save(epoch, epoch_state=None):
        loader_state = {"loader": train_loader.state_dict()} if isinstance(train_loader, DeviceCifarLoader) else {}
        guard.check(f"epoch {epoch + 1}", ckpt_path if os.path.exists(ckpt_path) else None)
        if ctx.is_main:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "epoch": epoch, "epoch_state": epoch_state, "best": best,
                                        "best_metrics": best_metrics, **loader_state, **(extra_state or {})},
                            meta=meta)

    for epoch in range(start_epoch, args.num_epochs):
        lr = set_epoch_lr(optimizer, args, epoch)
        w = ramp(epoch) if ramp else None
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        timer = Timer()
        net.train()
        meters = EpochMeters(method)
        if epoch_resume:  # the epoch's running metrics continue where the checkpoint left them
            meters.load_state_dict(epoch_resume)
        loader_at_start = train_loader.state_dict() if isinstance(train_loader, DeviceCifarLoader) else None
        batches = ResumableEpoch(train_loader, resume=epoch_resume)
        epoch_resume = None
        total = min(len(train_loader), args.steps_per_epoch or len(train_loader))
        for i, (x, y) in logger.progress(batches, desc=f"epoch {epoch + 1}/{args.num_epochs}", total=total):
            if args.steps_per_epoch and i >= args.steps_per_epoch:
                break
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            loss, terms, out = optimize(net, optimizer, step, x, y, epoch)
            guard.update(loss)
            meters.update(terms, out, y)  # per-batch means, as the released RunningAverage; summed on the device
            if args.save_every_steps and (i + 1) % args.save_every_steps == 0:
                state = dict(batches.state(i + 1), **meters.state_dict())
                if loader_at_start is not None:
                    state["loader"] = loader_at_start
                save(epoch, state)
        record = {"epoch": epoch + 1, "lr": lr}
        if w is not None:
            record["train/ramp"] = w
        record.update(meters.record("train"))
        record.update(evaluate(args, net, test_loader, step, method, epoch, ctx))
        seconds = timer.elapsed()
        record.update(epoch_time=seconds, images_per_s=meters.images * ctx.world_size / max(seconds, 1e-9))
        is_best = record[select] >= best  # ties go to the later epoch, as released
        if is_best:
            best, best_metrics = record[select], dict(record)
        record["best/" + select] = best
        save(epoch + 1)
        logger.log_epoch(record)
        logger.print(f"epoch {epoch + 1}: lr {lr:g} loss {record.get('train/loss', float('nan')):.4f} "
                     f"{select} {record[select]:.2f} (best {best:.2f})")
        if ctx.is_main:
            authors_files(run_dir, model, optimizer, epoch, record, best_metrics, is_best)
    if ctx.is_main:
        with open(os.path.join(run_dir, "parameters.json"), "w") as f:
            json.dump(dict(vars(args), **{"Total params": n_params / 1e6}), f, indent=4, default=str)
    logger.finish({select: best})
    dist.cleanup(ctx)
    return best


def authors_files(run_dir, model, optimizer, epoch, record, best_metrics, is_best):
    """last.pth / best.pth ({state_dict, optim_dict, epoch, accuracies}) and test_best_metrics.json, as released."""
    state = {"state_dict": model.state_dict(), "optim_dict": optimizer.state_dict(), "epoch": epoch + 1,
             **{k: v for k, v in record.items() if k.startswith("test/") and k.endswith("/top1")}}
    torch.save(state, os.path.join(run_dir, "last.pth"))
    if is_best:
        shutil.copyfile(os.path.join(run_dir, "last.pth"), os.path.join(run_dir, "best.pth"))
        with open(os.path.join(run_dir, "test_best_metrics.json"), "w") as f:
            json.dump(dict(best_metrics, epoch=epoch + 1), f, indent=4)


@torch.no_grad()
def evaluate(args, model, loader, step, method, epoch, ctx):
    """Test losses (same terms and ramp weight as training), every student's top-1/top-5 as the unweighted mean
    over test batches (released) and per sample, the mean of the individual students, and `dist`."""
    model.eval()
    means, accs, dist_sum, dist_n = DeviceMeans(), {}, 0.0, 0
    individuals = ["net"]
    for i, (x, y) in enumerate(loader):
        if args.eval_batches and i >= args.eval_batches:
            break
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        loss, terms, out = step(model, x, y, epoch)
        logits, individuals = student_logits(method, out) if method else ({"net": out["pro"]}, ["net"])
        for name, z in logits.items():
            accs.setdefault(name, AccuracyMeter()).update(z, y)
        means.update(dict(term_tensors(terms, individuals),
                          **{f"{name}/loss": cross_entropy(z, y) for name, z in logits.items()}))
        if method and len(individuals) >= 2:
            s, n = diversity_dist([logits[k] for k in individuals])
            dist_sum, dist_n = dist_sum + s.double(), dist_n + n
    record = {}
    for k, (total, n) in means.totals().items():
        total = dist.all_reduce_sum(torch.tensor([total, n], dtype=torch.float64), ctx)
        record[f"test/{k}"] = float(total[0] / total[1].clamp_min(1))
    for name, meter in accs.items():
        sums = dist.all_reduce_sum(torch.cat([meter.batch_acc_sum.double().cpu(), meter.correct.double().cpu(),
                                              torch.tensor([meter.batches, meter.samples], dtype=torch.float64)]),
                                   ctx)
        batches, samples = sums[4].clamp_min(1), sums[5].clamp_min(1)
        record[f"test/{name}/top1"] = float(sums[0] / batches)  # unweighted mean over batches (released)
        record[f"test/{name}/top5"] = float(sums[1] / batches)
        record[f"test/{name}/top1_per_sample"] = float(100.0 * sums[2] / samples)
        record[f"test/{name}/top5_per_sample"] = float(100.0 * sums[3] / samples)
    if method:
        record["test/mean/top1"] = float(np.mean([record[f"test/{n}/top1"] for n in individuals]))
        record["test/mean/top5"] = float(np.mean([record[f"test/{n}/top5"] for n in individuals]))
        if dist_n:
            total = dist.all_reduce_sum(torch.tensor([float(dist_sum), dist_n], dtype=torch.float64), ctx)
            record["test/dist"] = float(total[0] / total[1])
    return record
