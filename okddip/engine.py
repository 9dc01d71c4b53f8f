"""What the five training scripts share: the released recipe (flags, data, Nesterov SGD, the torch-1.0.1 aligned
step schedule, per-epoch ramp), the released metrics and the authors' output files, as one `RecipeRun` on the
repository's epoch driver (common.loop.fit). Each script's `build(args, num_classes)` returns a `Method`: its
networks, the forward of a batch and its loss.

Per epoch e (0-based): lr = lr0 * 0.1^(number of milestones <= e)  (what the released code got under torch 1.0.1),
ramp weight w(e) (OKDDip, ONE, CL-ILR), one pass over the training set, evaluation on the whole test set, then
best.pth / last.pth / test_best_metrics.json, checkpoint.pt and the log.jsonl line.
"""
import argparse
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from common.data import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, cifar_datasets, cifar_test_transform,
                         cifar_train_transform, imagenet_datasets, imagenet_train_transform, imagenet_val_transform,
                         make_loader)
from common.distributed import cleanup, per_process_batch, train_sampler, wrap_ddp
from common.fast import DeviceCifarLoader, add_fast_args
from common.loop import Run, evaluate, fit
from common.meters import topk_accuracy
from common.options import add_run_args, check_positive, loader_workers
from okddip.losses import cross_entropy
from okddip.models import check_arch
from okddip.students import INDIVIDUAL_NAMES, diversity_dist, student_logits

DATASETS = ("CIFAR10", "CIFAR100", "imagenet")
# Options that may differ when a run is resumed: they change nothing that is trained.
MAY_CHANGE = ("gpu_id", "efficient", "version")


def base_parser(description, schedule=True):
    """The flags every released script has (names and defaults as released) plus the repository's run and fast
    options. SCHEDULE: whether the script has --schedule (train_kd.py fixes its milestones instead)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet32", help="architecture (resnet32, resnet110, wide_resnet20_8, vgg16, "
                                                        "vgg19, densenetd40k12, ...; resnet34 for imagenet)")
    p.add_argument("--dataset", default="CIFAR10", choices=DATASETS)
    p.add_argument("--num_epochs", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=128, help="global batch (split over torchrun processes)")
    p.add_argument("--lr", type=float, default=0.1)
    if schedule:
        p.add_argument("--schedule", type=int, nargs="+", default=[150, 225],
                       help="epochs where lr is multiplied by 0.1")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay (on every parameter, as released)")
    p.add_argument("--dropout", type=float, default=0.0, help="VGG classifier dropout of the plain networks")
    p.add_argument("--efficient", action="store_true", help="accepted for compatibility; unused, as released")
    p.add_argument("--version", default="V0", help="suffix of the default output folder")
    p.add_argument("--num_workers", type=int, default=loader_workers(8),
                   help="loader processes (released: 8; never more than this machine's cores)")
    p.add_argument("--gpu_id", default="0", help="accepted for compatibility; choose the device with --device or "
                                                 "CUDA_VISIBLE_DEVICES")
    p.add_argument("--seed", type=int, default=None, help="seed torch/NumPy/random (the released code sets none)")
    add_run_args(p)
    add_fast_args(p)
    return p


def check_args(parser, args):
    """parser.error for every value of the base flags that the scripts cannot honour."""
    check_positive(parser, args, ["num_epochs", "batch_size", "lr"])
    at_least_zero = ["wd", "dropout", "num_workers"] + (["schedule"] if hasattr(args, "schedule") else [])
    check_positive(parser, args, at_least_zero, allow_zero=at_least_zero)
    if args.dropout >= 1:
        parser.error(f"--dropout must be below 1; got {args.dropout}")
    try:
        check_arch(args.model, args.dataset)
    except ValueError as e:
        parser.error(f"--model: {e}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's processes share the global batch
    if args.batch_size % world_size:
        parser.error(f"--batch_size {args.batch_size} is not divisible by the {world_size} torchrun processes")
    if args.data_on_device and args.dataset == "imagenet":
        parser.error("--data-on-device holds CIFAR on the device; ImageNet is read by the loader workers")


def check_distillation_args(parser, args):
    """parser.error for the distillation flags (those the script has: every one but train.py has a temperature)."""
    check_positive(parser, args, ["temperature"])
    at_least_zero = [n for n in ("alpha", "start_consistency", "length") if hasattr(args, n)]
    check_positive(parser, args, at_least_zero, allow_zero=at_least_zero)
    if not 0 <= getattr(args, "branch_dropout", 0) < 1:
        parser.error(f"--branch_dropout must be in [0, 1); got {args.branch_dropout}")


def default_run_dir(args, sub):
    """The released output folder, relative to the working directory: <dataset>/<num_epochs>/<sub>."""
    return os.path.join(args.dataset, str(args.num_epochs), sub)


def lr_at(epoch, lr, milestones):
    """lr of 0-based epoch e: lr * 0.1^(#milestones <= e) (torch 1.0.1 behaviour of the released step placement)."""
    return lr * 0.1 ** sum(1 for m in milestones if m <= epoch)


# ------------------------------------------------------------------------------------------------------ data ----
def normalisation(dataset):
    return (CIFAR10_MEAN, CIFAR10_STD) if dataset == "CIFAR10" else (CIFAR100_MEAN, CIFAR100_STD)


def datasets(args):
    """(train, test, number of classes) with the released transforms: CIFAR zero-padding crop then flip and the
    dataset's normalisation; ImageNet RandomResizedCrop(224) + flip, and Resize(256) + CenterCrop(224). ImageNet has
    as many classes as <data-root>/train has folders (1000 for ILSVRC-2012)."""
    if args.dataset == "imagenet":
        train, test = imagenet_datasets(args.data_root, imagenet_train_transform(), imagenet_val_transform())
        return train, test, len(train.classes)
    mean, std = normalisation(args.dataset)
    train, test = cifar_datasets(args.dataset, args.data_root, cifar_train_transform(mean, std, "constant",
                                                                                      "crop_flip"),
                                 cifar_test_transform(mean, std))
    return train, test, 10 if args.dataset == "CIFAR10" else 100


def loaders(args, train_set, test_set, setup):
    """Train/test loaders as released (shuffled train, sequential test, both of --batch_size, drop_last off), or with
    the fast path's data on the device the same semantics with CIFAR held there (DeviceCifarLoader reads the raw
    images, not the transforms); DDP processes draw their shards from a DistributedSampler either way."""
    ctx, batch = setup.ctx, per_process_batch(args.batch_size, setup.ctx)
    sampler = train_sampler(train_set, ctx, shuffle=True, seed=args.seed or 0)
    test_sampler = train_sampler(test_set, ctx, shuffle=False)
    if setup.fast.data_on_device and args.dataset != "imagenet":
        mean, std = normalisation(args.dataset)
        return (DeviceCifarLoader(train_set, batch, setup.device, mean, std, train=True, padding_mode="constant",
                                  order="crop_flip", shuffle=True, drop_last=False, sampler=sampler,
                                  seed=args.seed or 0),
                DeviceCifarLoader(test_set, batch, setup.device, mean, std, train=False, sampler=test_sampler))
    pin = setup.device.type == "cuda"
    return (make_loader(train_set, batch, shuffle=True, workers=args.num_workers, pin_memory=pin, sampler=sampler),
            make_loader(test_set, batch, workers=args.num_workers, pin_memory=pin, sampler=test_sampler))


# ---------------------------------------------------------------------------------------------------- method ----
@dataclass(frozen=True)
class Method:
    """What one script trains: `build(args, num_classes)` of each script returns one."""
    students: str | None    # okddip.students' naming of the outputs: "okddip", "one", "dml"; None: one network "net"
    model: torch.nn.Module  # every trained parameter (one optimizer over all of them, as released)
    forward: Callable       # forward(net, x) -> outputs {"pro": logits, ...}; run under the fast path's autocast
    loss: Callable          # loss(outputs, y, epoch) -> (total, {term: tensor}), the epoch's ramp weight inside
    select: str             # log key whose best value picks best.pth (the released criterion)
    milestones: tuple       # epochs where the lr is multiplied by 0.1
    ramp: Callable = None   # epoch -> weight of the distillation terms (OKDDip, ONE, CL-ILR)
    unused_parameters: bool = False  # a parameter gets no gradient (the released ONE --ind gate): DDP must look


def make_optimizer(model, args):
    """Nesterov SGD, momentum 0.9, weight decay on every parameter, one group (as released)."""
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.wd)


# --------------------------------------------------------------------------------------------------- metrics ----
TERM_NAMES = {"total_loss": "loss", "logged_train_true_loss": "true_loss", "logged_train_group_loss": "group_loss",
              "logged_train_teacher_loss": "teacher_loss", "ce_leader": "ce/leader", "kl_leader_T2": "kl/leader",
              "ce_gated_ensemble": "ce/gated"}


def term_tensors(terms, names):
    """Loss-term dict of okddip.losses -> flat {log name: 0-d tensor}; list entries get the students' names."""
    flat = {}
    for key, value in terms.items():
        if key == "consistency_weight":
            continue
        if isinstance(value, list):
            for name, v in zip(names, value):
                flat[f"{key.split('_')[0]}/{name}"] = v
        else:
            flat[TERM_NAMES.get(key, key)] = value
    return flat


def attention_terms(out):
    """Batch mean of the attention matrix (alpha_ab) and of its diagonal (the weight a peer gives itself)."""
    att = out.get("attention")
    if att is None:
        return {}
    mean = att.detach().mean(0)
    terms = {f"attention/{a}{b}": mean[a, b] for a in range(mean.size(0)) for b in range(mean.size(1))}
    terms["attention_self"] = mean.diagonal().mean()
    return terms


def named_logits(students, out):
    """({name: logits}, names of the individual students) of one forward's outputs."""
    if students is None:
        return {"net": out["pro"]}, ["net"]
    return student_logits(students, out)


def train_metrics(students, terms, out, y):
    """One batch's values as the released train() keeps them: every loss term, OKDDip's attention means, each
    student's top-1/top-5 (summed on the device by the loop's Meter)."""
    logits, individuals = named_logits(students, out)
    values = dict(term_tensors(terms, individuals), **attention_terms(out))
    for name, z in logits.items():
        values.update(topk_accuracy(z, y, (1, 5), f"{name}/"))
    return values


def evaluation_metrics(students, terms, out, y):
    """One test batch: the loss terms, every student's CE and top-1/top-5, and the diversity `dist` (per image)."""
    logits, individuals = named_logits(students, out)
    values = term_tensors(terms, individuals)
    values.update({f"{name}/loss": cross_entropy(z, y) for name, z in logits.items()})
    for name, z in logits.items():
        values.update(topk_accuracy(z, y, (1, 5), f"{name}/"))
    if students and len(individuals) >= 2:
        total, images = diversity_dist([logits[k] for k in individuals])
        values["dist"] = total / images
    return values


def with_student_means(record, students, prefix):
    """RECORD plus the mean top-1/top-5 of the individual students (<prefix>peer0/top1, ... -> <prefix>mean/top1),
    as released: OKDDip's peers (not the leader), ONE's branches, DML's networks."""
    if students is None:
        return record
    for k in ("top1", "top5"):
        individual = re.compile(re.escape(prefix + INDIVIDUAL_NAMES[students]) + rf"\d+/{k}")
        record[f"{prefix}mean/{k}"] = float(np.mean([v for key, v in record.items() if individual.fullmatch(key)]))
    return record


def evaluation_record(students, meter):
    """The released evaluate(): losses and accuracies as unweighted means over test batches, the accuracies also
    per sample, the mean of the individual students, and `dist` averaged over images."""
    per_batch, per_sample = meter.per_batch("test/"), meter.per_sample("test/")
    record = {k: v for k, v in per_batch.items() if not k.endswith(("/top1", "/top5")) and k != "test/dist"}
    for key in per_batch:
        if key.endswith("/top1"):
            top5 = key[:-1] + "5"
            record.update({key: per_batch[key], top5: per_batch[top5], key + "_per_sample": per_sample[key],
                           top5 + "_per_sample": per_sample[top5]})
    record = with_student_means(record, students, "test/")
    if "test/dist" in per_sample:
        record["test/dist"] = per_sample["test/dist"]
    return record


# ------------------------------------------------------------------------------------------------------- run ----
class RecipeRun(Run):
    """One run of any of the five scripts: the released recipe around the script's Method."""

    def __init__(self, setup, args, method, test_loader=None):
        self.setup, self.args, self.method, self.test_loader = setup, args, method, test_loader
        self.model = method.model.to(setup.device)  # the plain module: its state_dict is what is saved
        if setup.fast.channels_last:  # before DDP builds its gradient buckets
            self.model = self.model.to(memory_format=torch.channels_last)
        # `net` is what runs (DDP and/or compiled)
        self.net = setup.fast.prepare(wrap_ddp(self.model, setup.ctx,
                                               find_unused_parameters=method.unused_parameters))
        self.optimizer = make_optimizer(self.model, args)
        self.epoch, self.lr = 0, args.lr
        self.best, self.best_metrics = -1.0, None
        self.parameters = sum(p.numel() for p in self.model.parameters())
        setup.logger.print(f"{setup.script}: {args.model} on {args.dataset}, Total params: "
                           f"{self.parameters / 1e6:.2f}M, run dir {setup.run_dir}")

    def on_epoch_start(self, epoch):
        self.epoch, self.lr = epoch, lr_at(epoch, self.args.lr, self.method.milestones)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.net.train()

    def train_step(self, step, x, y):
        with self.setup.fast.autocast():
            out = self.method.forward(self.net, x)
        loss, terms = self.method.loss(out, y, self.epoch)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return train_metrics(self.method.students, terms, out, y)

    def train_record(self, meter):
        """lr, ramp weight and the per-batch means of the epoch (the released RunningAverage)."""
        record = {"lr": self.lr}
        if self.method.ramp is not None:
            record["train/ramp"] = self.method.ramp(self.epoch)
        record.update(meter.per_batch("train/"))
        return with_student_means(record, self.method.students, "train/")

    def evaluate(self, epoch):
        """The test set with the epoch's loss (its ramp weight too), as the released evaluate()."""
        self.net.eval()

        def forward(x, y):
            with self.setup.fast.autocast():
                out = self.method.forward(self.net, x)
            _, terms = self.method.loss(out, y, epoch)
            return evaluation_metrics(self.method.students, terms, out, y)

        return evaluation_record(self.method.students, evaluate(forward, self.test_loader, self.setup))

    def on_epoch_end(self, epoch, record):
        select = self.method.select
        is_best = record[select] >= self.best  # ties go to the later epoch, as released
        if is_best:
            self.best, self.best_metrics = record[select], dict(record)
        record["best/" + select] = self.best
        self.setup.logger.print(f"epoch {epoch + 1}: lr {self.lr:g} loss {record.get('train/loss', float('nan')):.4f} "
                                f"{select} {record[select]:.2f} (best {self.best:.2f})")
        if self.setup.ctx.is_main:
            self.authors_files(epoch, record, is_best)

    def authors_files(self, epoch, record, is_best):
        """last.pth / best.pth ({state_dict, optim_dict, epoch, accuracies}) and test_best_metrics.json every
        epoch, parameters.json after the last one, as released."""
        run_dir = self.setup.run_dir
        state = {"state_dict": self.model.state_dict(), "optim_dict": self.optimizer.state_dict(), "epoch": epoch + 1,
                 **{k: v for k, v in record.items() if k.startswith("test/") and k.endswith("/top1")}}
        torch.save(state, os.path.join(run_dir, "last.pth"))
        if is_best:
            shutil.copyfile(os.path.join(run_dir, "last.pth"), os.path.join(run_dir, "best.pth"))
            with open(os.path.join(run_dir, "test_best_metrics.json"), "w") as f:
                json.dump(dict(self.best_metrics, epoch=epoch + 1), f, indent=4)
        if epoch + 1 == self.args.num_epochs:
            with open(os.path.join(run_dir, "parameters.json"), "w") as f:
                json.dump(dict(vars(self.args), **{"Total params": self.parameters / 1e6}), f, indent=4, default=str)

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "best": self.best,
                "best_metrics": self.best_metrics}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best, self.best_metrics = state["best"], state["best_metrics"]


def train(setup, args, method, train_set, test_set):
    """The whole run: the loaders, the RecipeRun, every epoch (common.loop.fit); returns the last log record."""
    train_loader, test_loader = loaders(args, train_set, test_set, setup)
    record = fit(RecipeRun(setup, args, method, test_loader), train_loader, setup, args.num_epochs)
    cleanup(setup.ctx)
    return record

