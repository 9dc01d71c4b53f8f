"""The FFSD training script body, run by cifar.py (CIFAR-100) and imagenet.py (ImageNet under torchrun).

Order of one epoch (as released): every iteration trains the students, the fusion module, the leader and the
decoders (ffsd.training.train_step); then every network is evaluated on the test set, the authors' best-model files
are written when a network's test top-1 strictly improves, the schedulers step, and (here) the full-state checkpoint
and the log.jsonl line are written.
"""
import logging
import os
import random
import signal
import time

import numpy as np
import torch
from torch.utils.data import Subset

from common.checkpoint import CHECKPOINT_NAME, ResumableEpoch, load_checkpoint, save_checkpoint
from common.data import CIFAR100_MEAN, CIFAR100_STD, cifar_datasets, cifar_test_transform, cifar_train_transform, \
    imagenet_datasets, imagenet_train_transform, imagenet_val_transform, make_loader
from common.fast import DeviceCifarLoader, autocast
from common.distributed import all_reduce_sum, barrier, cleanup, init_distributed, per_process_batch, \
    train_sampler, wrap_ddp
from common.logging import FiniteGuard, RunLogger

from ffsd.options import build_parser, config_text, parse
from ffsd.training import FFSDNetworks, TermMeters, batch_accuracies, build_networks, build_optimizers, \
    build_schedulers, epoch_lambdas, evaluate, imagenet_lr, prepare_networks, set_sgd_lr, train_step


def authors_logger(run_dir, enabled):
    """The authors' `FFSD` logger: '<mm/dd hh:mm:ss AM/PM> | message' to <run dir>/logger.log and the console."""
    logger = logging.getLogger(f"FFSD.{run_dir}")
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    logger.propagate = False
    if enabled and not logger.handlers:
        fmt = logging.Formatter("%(asctime)s | %(message)s", datefmt="%m/%d %I:%M:%S %p")
        for handler in (logging.FileHandler(os.path.join(run_dir, "logger.log")), logging.StreamHandler()):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    return logger


def train_line(epoch, seen, total, seconds, avg, model_num):
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


def load_data(args, ctx):
    if args.dataset == "cifar100":
        train_set, test_set = cifar_datasets(
            "cifar100", args.data_root,
            cifar_train_transform(CIFAR100_MEAN, CIFAR100_STD, padding_mode="reflect", order="pad_flip_crop"),
            cifar_test_transform(CIFAR100_MEAN, CIFAR100_STD), flag="--dataroot/--data-root")
        return train_set, test_set, args.train_batch_size, args.test_batch_size
    train_set, test_set = imagenet_datasets(args.data_root, imagenet_train_transform(), imagenet_val_transform(),
                                            flag="--dataroot/--data-root")
    if ctx.distributed:  # each process evaluates its own slice; counts are summed over processes
        test_set = Subset(test_set, range(ctx.rank, len(test_set), ctx.world_size))
    return (train_set, test_set, per_process_batch(args.train_batch_size, ctx),
            per_process_batch(args.test_batch_size, ctx))


def make_loaders(args, ctx, device):
    """(train loader, test loader, train set, train sampler): the released PIL pipeline (8 workers), or with
    --data-on-device uint8 CIFAR on the device and the released augmentation (reflect pad, flip, crop) there. The
    sampler is the DistributedSampler under torchrun (set_epoch each epoch), else None."""
    train_set, test_set, train_batch, test_batch = load_data(args, ctx)
    sampler = train_sampler(train_set, ctx, shuffle=True, seed=args.seed)
    if args.data_on_device:
        cifar = dict(device=device, mean=CIFAR100_MEAN, std=CIFAR100_STD, padding_mode="reflect",
                     order="pad_flip_crop", channels_last=args.channels_last)
        train_loader = DeviceCifarLoader(train_set, train_batch, train=True, shuffle=sampler is None, drop_last=False,
                                         sampler=sampler, seed=args.seed, **cifar)
        return train_loader, DeviceCifarLoader(test_set, test_batch, train=False, **cifar), train_set, sampler
    pin = device.type == "cuda"
    return (make_loader(train_set, train_batch, shuffle=True, workers=args.workers, pin_memory=pin, sampler=sampler),
            make_loader(test_set, test_batch, workers=args.workers, pin_memory=pin), train_set, sampler)


def main(argv=None, dataset="cifar100", script="ffsd/cifar.py"):
    args = parse(argv, dataset)
    ctx = init_distributed(args.device)
    device = ctx.device if ctx.distributed else torch.device(args.device)
    run_dir = args.run_dir or os.path.join(args.checkpoints_dir, args.name)
    args.run_dir = run_dir
    logger = RunLogger(run_dir, args, script=script, enabled=ctx.is_main, quiet=args.quiet, device=device)
    log = authors_logger(run_dir, ctx.is_main)
    weights_dir = os.path.join(run_dir, "checkpoints")
    ckpt_path = os.path.join(run_dir, CHECKPOINT_NAME)
    if ctx.is_main:
        os.makedirs(weights_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.txt"), "w") as f:
            f.write(config_text(args, build_parser(dataset)))
    kill_at = int(os.environ.get("FFSD_KILL_AT_STEP", "0"))  # tests: SIGKILL right after this global step

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    train_loader, test_loader, train_set, sampler = make_loaders(args, ctx, device)

    probe = 224 if dataset == "imagenet" else 32
    nets = build_networks(args.model, dataset, args.model_num, probe_size=probe).to(device)
    fast_nets = prepare_networks(nets, args)  # channels_last / compiled; nets keeps the plain modules to save
    amp = lambda: autocast(args, device)  # noqa: E731
    optimizers = build_optimizers(nets, args.lr, args.momentum, args.weight_decay)
    schedulers = build_schedulers(optimizers, args, dataset)
    wrap = lambda m: wrap_ddp(m, ctx)  # noqa: E731
    forward = fast_nets if not ctx.distributed else FFSDNetworks(
        [wrap(s) for s in fast_nets.students], wrap(fast_nets.leader), wrap(fast_nets.fusion_module),
        [wrap(d) for d in fast_nets.sd_students], wrap(fast_nets.sd_leader))
    reduce = (lambda t: all_reduce_sum(t, ctx)) if ctx.distributed else None

    meta = {"script": script, "model": args.model, "model_num": args.model_num, "dataset": dataset}
    start_epoch, epoch_resume = args.start_epoch, None
    best = {}  # network -> (epoch, test top-1)
    if args.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, expect_meta=meta, map_location=device, restore_rng=True)
        nets.load_state_dict(ckpt["networks"])
        for k, o in optimizers.items():
            o.load_state_dict(ckpt["optimizers"][k])
        for k, s in schedulers.items():
            s.load_state_dict(ckpt["schedulers"][k])
        best, epoch_resume = ckpt["best"], ckpt.get("epoch_state")
        if args.data_on_device and ckpt.get("train_loader") is not None:  # its augmentation/shuffle generator
            train_loader.load_state_dict(ckpt["train_loader"])
        start_epoch = ckpt["epoch"] + (0 if epoch_resume else 1)
        logger.truncate_after(ckpt["epoch"] if not epoch_resume else ckpt["epoch"] - 1)
        log.info(f"resumed from {ckpt_path} at epoch {start_epoch}")

    def save(epoch, epoch_state=None):
        """Full state after EPOCH (or inside it, with epoch_state)."""
        guard.check(f"epoch {epoch}", ckpt_path if os.path.exists(ckpt_path) else None)
        loader_state = {"train_loader": train_loader.state_dict()} if args.data_on_device else {}
        if ctx.is_main:
            save_checkpoint(ckpt_path, {"networks": nets.state_dict(), "epoch": epoch, "best": best,
                                        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                                        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                                        "epoch_state": epoch_state, **loader_state}, meta=meta)
        barrier(ctx)

    def save_authors(name, module, epoch, index):
        torch.save({"weight": module.state_dict(), "epoch": epoch, "cfg": args.model, "index": index},
                   os.path.join(weights_dir, f"model{name}.pth"))

    guard = FiniteGuard()
    end_epoch = args.n_epochs + 1 if args.inclusive_epochs else args.n_epochs
    # ImageNet warm-up: iterations per epoch at the global batch (released: len(train) // 256, its forced batch)
    iterations_per_epoch = len(train_set) // args.train_batch_size
    if dataset == "imagenet" and iterations_per_epoch < 1:
        raise SystemExit(f"--train_batch_size {args.train_batch_size} exceeds the {len(train_set)} training images: "
                         f"the ImageNet lr warm-up needs at least one iteration per epoch")
    print_every = args.print_every or max(1, len(train_set) // args.train_batch_size // 10)
    steps_total = len(train_loader) if not args.steps_per_epoch else min(args.steps_per_epoch, len(train_loader))
    step_global = 0
    test = {}
    for epoch in range(start_epoch, end_epoch):
        lambdas = epoch_lambdas(args, epoch)
        nets.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        timer_start = time.perf_counter()
        meters = TermMeters()
        if args.data_on_device:  # the device loader draws from its own generator: replay the epoch from its start
            if epoch_resume:
                train_loader.load_state_dict(epoch_resume["train_loader"])
            loader_at_epoch_start = train_loader.state_dict()
        batches = ResumableEpoch(train_loader, resume=epoch_resume)
        if epoch_resume:
            meters.load_state_dict(epoch_resume["meters"], device)
        epoch_resume = None
        for step, (x, y) in logger.progress(batches, desc=f"epoch {epoch}", total=steps_total):
            if args.steps_per_epoch and step >= args.steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if dataset == "imagenet":
                set_sgd_lr(optimizers, imagenet_lr(args.lr, epoch, step, iterations_per_epoch, args.imagenet_warmup))
            terms, out = train_step(forward, optimizers, x, y, lambdas, args.temperature, args.follower_sd_weight,
                                    args.normalized_diversity_target, autocast=amp)
            logits = {f"student{i}": z for i, z in enumerate(out["student_logits"])}
            logits.update(fusion=out["fusion_logits"], leader=out["leader_logits"])
            terms.update(batch_accuracies(logits, y))
            total = sum(terms[f"student{i}/total"] for i in range(args.model_num))
            terms["loss"] = total + terms["fusion/total"] + terms["leader/total"]
            guard.update(terms["loss"])
            meters.update(terms, y.size(0))
            step_global += 1
            if (step + 1) % print_every == 0:
                guard.check(f"epoch {epoch} step {step + 1}")
                log.info(train_line(epoch, (step + 1) * args.train_batch_size, len(train_set),
                                    time.perf_counter() - timer_start, meters.averages(), args.model_num))
            if args.save_every_steps and (step + 1) % args.save_every_steps == 0:
                epoch_state = dict(batches.state(step + 1), meters=meters.state_dict())
                if args.data_on_device:
                    epoch_state["train_loader"] = loader_at_epoch_start
                save(epoch, epoch_state)
            if kill_at and step_global == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        train_seconds = time.perf_counter() - timer_start
        train_avg = meters.averages()

        test = evaluate(fast_nets, test_loader, device, args.eval_batches, reduce, amp, args.channels_last)
        networks = {f"student{i}": (str(i), nets.students[i]) for i in range(args.model_num)}
        networks.update(fusion=("fusion", nets.fusion_module), leader=("leader", nets.leader))
        for name, (index, module) in networks.items():
            acc = test[f"{name}/top1"]
            if name not in best or acc > best[name][1]:  # strict: the earliest tied epoch wins, as released
                best[name] = (epoch, acc)
                if ctx.is_main:
                    save_authors(f"{index}_best", module, epoch, index)
            if args.save_epoch_checkpoints and name.startswith("student") and ctx.is_main:
                save_authors(f"{index}_{epoch}", module, epoch, index)
        for key in ("average/top1", "ensemble_oracle/top1"):
            if key not in best or test[key] > best[key][1]:
                best[key] = (epoch, test[key])
        log.info(f"Epoch[{epoch}]\tTime {time.perf_counter() - timer_start:.2f}s\t" + "\t".join(
            f"Model[{i}]:\tAccuracy {test[f'student{i}/top1']:.2f}%" for i in range(args.model_num)) +
            f"\tModel[Fusion]:\tAccuracy {test['fusion/top1']:.2f}%\tModel[Leader]:\tAccuracy "
            f"{test['leader/top1']:.2f}%\tAverage Acc:{test['average/top1']:.2f}%\tEnsemble Acc:"
            f"{test['ensemble_oracle/top1']:.2f}%\tMean-logit Ensemble Acc:{test['ensemble/top1']:.2f}%")
        lr_now = optimizers["student0"].param_groups[0]["lr"]
        for s in schedulers.values():
            s.step()
        record = {"epoch": epoch, "lr": lr_now, "epoch_time": train_seconds,
                  "images_per_s": meters.count * ctx.world_size / max(train_seconds, 1e-9),
                  "train/loss": train_avg.pop("loss")}
        record.update({f"lambda/{k}": v for k, v in lambdas.items()})
        record.update({f"train/{k}": v for k, v in train_avg.items()})
        record.update({f"test/{k}": v for k, v in test.items()})
        record.update({f"best/{k}": v[1] for k, v in best.items() if not k.endswith("/top1")})
        record["best/leader/top1"] = best["leader"][1]
        save(epoch)
        logger.log_epoch(record)

    if best:
        log.info(f"Best Average/Ensemble Epoch{best['average/top1'][0]}:{best['average/top1'][1]:.2f}%/"
                 f"Epoch{best['ensemble_oracle/top1'][0]}:{best['ensemble_oracle/top1'][1]:.2f}%")
        log.info(f"Model[Fusion]/[Leader] Epoch{best['fusion'][0]}:{best['fusion'][1]:.2f}%/"
                 f"Epoch{best['leader'][0]}:{best['leader'][1]:.2f}%")
        log.info("Best Models: " + "/".join(f"Epoch {best[f'student{i}'][0]}:{best[f'student{i}'][1]:.2f}%"
                                            for i in range(args.model_num)))
    logger.finish({"best/leader/top1": best["leader"][1] if best else None,
                   "test/leader/top1": test.get("leader/top1")})
    cleanup(ctx)
