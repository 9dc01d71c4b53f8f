"""The FFSD training script body, run by cifar.py (CIFAR-100) and imagenet.py (ImageNet under torchrun).

Order of one epoch (as released): every iteration trains the students, the fusion module, the leader and the
decoders (ffsd.training.train_step; on ImageNet the SGD lr is set before each iteration); then every network is
evaluated on the test set, the authors' best-model files are written when a network's test top-1 strictly improves,
the schedulers step, and (here) the full-state checkpoint and the log.jsonl line are written (common.loop.fit).
Epochs are numbered from 1, as released: the loop is range(start_epoch, n_epochs).
"""
import logging
import os
import time

import torch
from torch.utils.data import Subset

from common.data import CIFAR100_MEAN, CIFAR100_STD, cifar_datasets, cifar_test_transform, cifar_train_transform, \
    imagenet_datasets, imagenet_train_transform, imagenet_val_transform, make_loader
from common.distributed import cleanup, per_process_batch, train_sampler, wrap_ddp
from common.fast import DeviceCifarLoader
from common.loop import Run, evaluate, fit
from common.options import setup_run

from ffsd import training
from ffsd.options import MAY_CHANGE, check_args, config_text, device_of, epoch_range, get_args_parser

SCRIPTS = {"cifar100": "ffsd/cifar.py", "imagenet": "ffsd/imagenet.py"}
INPUT_SIZE = {"cifar100": 32, "imagenet": 224}


def authors_logger(run_dir, enabled):
    """The authors' `FFSD` logger: '<mm/dd hh:mm:ss AM/PM> | message' to <run dir>/logger.log and the console."""
    logger = logging.getLogger(f"FFSD.{run_dir}")
    for handler in list(logger.handlers):  # a folder used again in this process (tests, --overwrite): a fresh file
        handler.close()
        logger.removeHandler(handler)
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    logger.propagate = False
    if enabled:
        fmt = logging.Formatter("%(asctime)s | %(message)s", datefmt="%m/%d %I:%M:%S %p")
        for handler in (logging.FileHandler(os.path.join(run_dir, "logger.log")), logging.StreamHandler()):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    return logger


def train_line(epoch, seen, total, seconds, avg, model_num):
    """The authors' running print of the epoch's per-sample means AVG."""
    parts = [f"Epoch[{epoch}] ({seen}/{total})\tTime {seconds:.2f}s"]
    for i in range(model_num):
        sd = f"sd_student{i}"
        parts.append(f"Model[{i}]: Loss {avg.get(f'student{i}/total', 0):.4f}\tCE {avg.get(f'student{i}/ce', 0):.4f}"
                     f"\tDML {avg.get(f'student{i}/dml', 0):.4f}\tDiversity {avg.get(f'student{i}/diversity', 0):.6f}"
                     f"\tSD Feature {avg.get(f'{sd}/feature', 0):.4f}\tSD Attention {avg.get(f'{sd}/attention', 0):.4f}"
                     f"\tSelf-Distillation {avg.get(f'student{i}/self_distillation', 0):.6f}"
                     f"\tAccuracy {avg[f'student{i}/top1']:.2f}%")
    parts.append(f"Model[Fusion]: Loss {avg['fusion/total']:.4f}\tCE {avg['fusion/ce']:.4f}\tKL {avg['fusion/kl']:.4f}"
                 f"\tAccuracy {avg['fusion/top1']:.2f}%")
    parts.append(f"Model[Leader]: Loss {avg['leader/total']:.4f}\tCE {avg['leader/ce']:.4f}"
                 f"\tEnsemble {avg['leader/kl']:.4f}\tFusion {avg['leader/fusion']:.4f}"
                 f"\tTrans Fusion {avg['leader/trans_fusion']:.4f}\tSD Feature {avg['sd_leader/feature']:.4f}"
                 f"\tSD Attention {avg['sd_leader/attention']:.4f}"
                 f"\tSelf-Distillation {avg['leader/self_distillation']:.4f}\tAccuracy {avg['leader/top1']:.2f}%")
    parts.append(f"Average Acc: {avg['average/top1']:.2f}%\tEnsemble Acc: {avg['ensemble_oracle/top1']:.2f}%")
    return "\t".join(parts)


def datasets(args):
    """(train set, test set) with the released transforms: CIFAR-100 reflect pad 4, flip, crop 32 (Pad-Flip-Crop) and
    its normalisation; ImageNet RandomResizedCrop(224) + flip, and Resize(256) + CenterCrop(224)."""
    if args.dataset == "cifar100":
        return cifar_datasets(
            "cifar100", args.data_root,
            cifar_train_transform(CIFAR100_MEAN, CIFAR100_STD, padding_mode="reflect", order="pad_flip_crop"),
            cifar_test_transform(CIFAR100_MEAN, CIFAR100_STD), flag="--dataroot/--data-root")
    return imagenet_datasets(args.data_root, imagenet_train_transform(), imagenet_val_transform(),
                             flag="--dataroot/--data-root")


def loaders(args, train_set, test_set, setup):
    """(train loader, test loader): the released PIL pipeline (shuffled, drop_last off, --workers), or with the fast
    path's data on the device uint8 CIFAR there with the released augmentation done there. Under torchrun the train
    set is split by a DistributedSampler (fit sets its epoch) and each process evaluates its own slice of the test set
    (the evaluation meter sums over processes); the global batches are split over the processes."""
    ctx = setup.ctx
    train_batch = per_process_batch(args.train_batch_size, ctx)
    test_batch = per_process_batch(args.test_batch_size, ctx)
    sampler = train_sampler(train_set, ctx, shuffle=True, seed=args.seed)
    if setup.fast.data_on_device and args.dataset == "cifar100":
        cifar = dict(device=setup.device, mean=CIFAR100_MEAN, std=CIFAR100_STD, padding_mode="reflect",
                     order="pad_flip_crop")
        return (DeviceCifarLoader(train_set, train_batch, train=True, shuffle=sampler is None, drop_last=False,
                                  sampler=sampler, seed=args.seed, **cifar),
                DeviceCifarLoader(test_set, test_batch, train=False, **cifar))
    if ctx.distributed:
        test_set = Subset(test_set, range(ctx.rank, len(test_set), ctx.world_size))
    pin = setup.device.type == "cuda"
    return (make_loader(train_set, train_batch, shuffle=True, workers=args.workers, pin_memory=pin, sampler=sampler),
            make_loader(test_set, test_batch, workers=args.workers, pin_memory=pin))


class FFSDRun(Run):
    """The released trainer on common.loop.fit: the networks NETS (build_networks, on the setup's device), their six
    optimizers and per-epoch schedulers, the lambda warm-up, the ImageNet per-iteration lr, the authors' console and
    best-model files. TRAIN_SIZE: images in the training set, for the print line and the ImageNet warm-up length (0
    outside a training run, where no warm-up epoch is stepped)."""

    def __init__(self, setup, args, nets, train_size=0, test_loader=None):
        self.setup, self.args, self.nets, self.test_loader = setup, args, nets, test_loader
        self.imagenet = args.dataset == "imagenet"
        self.train_size = train_size
        # released: len(train) // 256, the batch its trainer forced; here the batch asked for (256 by default)
        self.iterations_per_epoch = train_size // args.train_batch_size
        # the networks called: channels_last / compiled, DDP-wrapped under torchrun; nets keeps the state to save
        self.prepared = training.prepare_networks(nets, setup.fast)
        self.forward = self.prepared.wrapped(lambda m: wrap_ddp(m, setup.ctx)) if setup.ctx.distributed \
            else self.prepared
        self.optimizers = training.build_optimizers(nets, args.lr, args.momentum, args.weight_decay)
        self.schedulers = training.build_schedulers(self.optimizers, args, args.dataset)
        self.best = {}  # network (or "average/top1", "ensemble_oracle/top1") -> (epoch, test top-1)
        self.log = authors_logger(setup.run_dir, setup.ctx.is_main and bool(setup.run_dir))
        self.epoch, self.epoch_start = args.start_epoch, 0.0
        self.lambdas = training.epoch_lambdas(args, args.start_epoch)

    def epoch_label(self, epoch):
        return epoch  # the released epochs are 1-based already

    def on_epoch_start(self, epoch):
        self.epoch, self.lambdas = epoch, training.epoch_lambdas(self.args, epoch)
        self.epoch_start = time.perf_counter()
        self.nets.train()

    def train_step(self, step, x, y):
        args = self.args
        if self.imagenet:
            lr = training.imagenet_lr(args.lr, self.epoch, step, self.iterations_per_epoch, args.imagenet_warmup)
            training.set_sgd_lr(self.optimizers, lr)
        terms, out = training.train_step(self.forward, self.optimizers, x, y, self.lambdas, args.temperature,
                                args.follower_sd_weight, args.normalized_diversity_target,
                                autocast=self.setup.fast.autocast)
        logits = {f"student{i}": z for i, z in enumerate(out["student_logits"])}
        logits.update(fusion=out["fusion_logits"], leader=out["leader_logits"])
        terms.update(training.batch_accuracies(logits, y))
        students = sum(terms[f"student{i}/total"] for i in range(args.model_num))
        terms["loss"] = students + terms["fusion/total"] + terms["leader/total"]
        return terms

    def on_print(self, epoch, step, meter):
        self.log.info(train_line(epoch, (step + 1) * self.args.train_batch_size, self.train_size,
                                 time.perf_counter() - self.epoch_start, meter.per_sample(), self.args.model_num))

    def train_record(self, meter):
        """The lr of the epoch's last iteration (before the schedulers step), the warmed-up lambdas, and the
        per-sample means of every loss term and train accuracy (train/loss: the student, fusion and leader totals)."""
        record = {"lr": self.optimizers["student0"].param_groups[0]["lr"]}
        record.update({f"lambda/{k}": v for k, v in self.lambdas.items()})
        record.update(meter.per_sample("train/"))
        return record

    def evaluate(self, epoch):
        """Eval mode, every network on the test set (test_metrics)."""
        self.nets.eval()

        def forward(x, y):
            with self.setup.fast.autocast():
                logits = training.predict(self.prepared, x)
            return training.test_metrics(logits, y)
        return evaluate(forward, self.test_loader, self.setup).per_sample("test/")

    def on_epoch_end(self, epoch, record):
        """The released epoch end: best-model files (strict >, so the earliest tied epoch wins), the test line, the
        schedulers' step; the best values go into the log record."""
        test = {k[len("test/"):]: v for k, v in record.items() if k.startswith("test/")}
        networks = {f"student{i}": (str(i), self.nets.students[i]) for i in range(self.args.model_num)}
        networks.update(fusion=("fusion", self.nets.fusion_module), leader=("leader", self.nets.leader))
        for name, (index, module) in networks.items():
            improved = self.improve(name, epoch, test[f"{name}/top1"])
            if improved and self.setup.ctx.is_main:
                self.save_authors(f"{index}_best", module, epoch, index)
            if self.args.save_epoch_checkpoints and name.startswith("student") and self.setup.ctx.is_main:
                self.save_authors(f"{index}_{epoch}", module, epoch, index)
        for key in ("average/top1", "ensemble_oracle/top1"):
            self.improve(key, epoch, test[key])
        self.log.info(f"Epoch[{epoch}]\tTime {time.perf_counter() - self.epoch_start:.2f}s\t" + "\t".join(
            f"Model[{i}]:\tAccuracy {test[f'student{i}/top1']:.2f}%" for i in range(self.args.model_num)) +
            f"\tModel[Fusion]:\tAccuracy {test['fusion/top1']:.2f}%\tModel[Leader]:\tAccuracy "
            f"{test['leader/top1']:.2f}%\tAverage Acc:{test['average/top1']:.2f}%\tEnsemble Acc:"
            f"{test['ensemble_oracle/top1']:.2f}%\tMean-logit Ensemble Acc:{test['ensemble/top1']:.2f}%")
        for scheduler in self.schedulers.values():
            scheduler.step()
        record.update({f"best/{k}": v[1] for k, v in self.best.items() if not k.endswith("/top1")})
        record["best/leader/top1"] = self.best["leader"][1]

    def improve(self, name, epoch, accuracy):
        """Record ACCURACY as NAME's best if it is strictly higher; returns whether it was."""
        if name in self.best and accuracy <= self.best[name][1]:
            return False
        self.best[name] = (epoch, accuracy)
        return True

    def save_authors(self, name, module, epoch, index):
        """checkpoints/model<name>.pth in the authors' format."""
        torch.save({"weight": module.state_dict(), "epoch": epoch, "cfg": self.args.model, "index": index},
                   os.path.join(self.setup.run_dir, "checkpoints", f"model{name}.pth"))

    def log_best(self):
        """The authors' final lines."""
        if not self.best:
            return
        best = self.best
        self.log.info(f"Best Average/Ensemble Epoch{best['average/top1'][0]}:{best['average/top1'][1]:.2f}%/"
                      f"Epoch{best['ensemble_oracle/top1'][0]}:{best['ensemble_oracle/top1'][1]:.2f}%")
        self.log.info(f"Model[Fusion]/[Leader] Epoch{best['fusion'][0]}:{best['fusion'][1]:.2f}%/"
                      f"Epoch{best['leader'][0]}:{best['leader'][1]:.2f}%")
        self.log.info("Best Models: " + "/".join(f"Epoch {best[f'student{i}'][0]}:{best[f'student{i}'][1]:.2f}%"
                                                 for i in range(self.args.model_num)))

    def state_dict(self):
        return {"networks": self.nets.state_dict(), "best": self.best,
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()}}

    def load_state_dict(self, state):
        self.nets.load_state_dict(state["networks"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.best = state["best"]


def main(argv=None, dataset="cifar100"):
    parser = get_args_parser(dataset)
    args = parser.parse_args(argv)
    check_args(parser, args)
    train_set, test_set = datasets(args)
    if dataset == "imagenet" and len(train_set) < args.train_batch_size:
        parser.error(f"--train_batch_size {args.train_batch_size} exceeds the {len(train_set)} training images: the "
                     f"ImageNet lr warm-up needs at least one iteration per epoch")
    setup = setup_run(parser, args, SCRIPTS[dataset], os.path.join(args.checkpoints_dir, args.name), seed=args.seed,
                      may_change=MAY_CHANGE, device=device_of(args))
    if setup.ctx.is_main:
        os.makedirs(os.path.join(setup.run_dir, "checkpoints"), exist_ok=True)
        if not setup.resume:
            with open(os.path.join(setup.run_dir, "config.txt"), "w") as f:
                f.write(config_text(args, parser))
    train_loader, test_loader = loaders(args, train_set, test_set, setup)
    nets = training.build_networks(args.model, dataset, args.model_num, INPUT_SIZE[dataset]).to(setup.device)
    run = FFSDRun(setup, args, nets, len(train_set), test_loader)
    print_every = args.print_every or max(1, len(train_set) // args.train_batch_size // 10)
    record = fit(run, train_loader, setup, epoch_range(args), print_every=print_every)
    run.log_best()
    cleanup(setup.ctx)
    return record

