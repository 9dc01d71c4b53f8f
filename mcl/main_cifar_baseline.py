"""One CIFAR-100 network trained alone with cross-entropy (the baselines of the L-MCL tables), as the authors'
main_cifar_baseline.py: shuffled batches of 128, Nesterov SGD, wd 5e-4, epoch-wise cosine lr from 0.1, 300 epochs.

    cd mcl && python main_cifar_baseline.py --arch resnet32_cifar --data-root ./data --run-dir runs/r32_baseline
"""
import argparse
import os
import signal
from functools import partial

import numpy as np
import torch

from common.checkpoint import CHECKPOINT_NAME, ResumableEpoch, load_checkpoint, load_state_dict_checked, \
    save_checkpoint
from common.data import cifar_datasets, cifar_test_transform, cifar_train_transform, make_loader
from common.fast import DeviceCifarLoader, add_fast_args, autocast, prepare_model, resolve_fast_args
from common.logging import FiniteGuard, RunLogger, add_common_args
from common.meters import AccuracyMeter, Timer
from mcl.models import CIFAR_BASELINES, build_cifar_baseline
from mcl.train_utils import LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD, baseline_step, build_as_released, check_positive, \
    evaluate_single, lr_at_epoch, set_lr

SCRIPT = "mcl/main_cifar_baseline.py"


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar100", help="only names the run folder; the data is CIFAR-100")
    p.add_argument("--arch", default="resnet32_cifar", help="network: " + ", ".join(CIFAR_BASELINES))
    p.add_argument("--init-lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lr-type", default="cosine", choices=["cosine", "multistep"])
    p.add_argument("--milestones", type=int, nargs="+", default=[150, 225])
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--gpu-id", default="0", help="accepted for compatibility; use --device")
    p.add_argument("--manual_seed", "--seed", dest="manual_seed", type=int, default=0)
    p.add_argument("--evaluate", "-e", action="store_true", help="only test --evaluate-checkpoint")
    p.add_argument("--evaluate-checkpoint", default=None, help="default: <run-dir>/best.pt")
    p.add_argument("--checkpoint-dir", default="./checkpoint", help="parent of the default run folder")
    add_common_args(p, data_root_default="./data/", data_root_flags=("--data-root", "--data"))
    add_fast_args(p)
    return p


def cifar_loaders(args, device):
    """(train loader, test loader): the authors' PIL pipeline (shuffled, last batch kept, zero-pad crop then flip,
    their mean/std) with --num-workers processes, or with --data-on-device the same on the device."""
    train_set, test_set = cifar_datasets(
        "CIFAR100", args.data_root, cifar_train_transform(LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD, "constant", "crop_flip"),
        cifar_test_transform(LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD))
    if args.data_on_device:
        cifar = dict(device=device, mean=LMCL_CIFAR100_MEAN, std=LMCL_CIFAR100_STD, padding_mode="constant",
                     order="crop_flip", channels_last=args.channels_last)
        return (DeviceCifarLoader(train_set, args.batch_size, train=True, shuffle=True, drop_last=False,
                                  seed=args.manual_seed, **cifar), DeviceCifarLoader(test_set, args.batch_size,
                                                                                    train=False, **cifar))
    pin = device.type == "cuda"
    return (make_loader(train_set, args.batch_size, shuffle=True, workers=args.num_workers, pin_memory=pin),
            make_loader(test_set, args.batch_size, workers=args.num_workers, pin_memory=pin))


def main(argv=None):
    parser = get_parser()
    args = resolve_fast_args(parser.parse_args(argv))
    check_positive(parser, args, ["epochs", "batch_size"])
    np.random.seed(args.manual_seed)
    torch.manual_seed(args.manual_seed)
    try:
        # the authors' probe is drawn (so the augmentation draws follow theirs) but its output is not needed here
        model, _ = build_as_released(partial(build_cifar_baseline, args.arch, 100), (1, 3, 32, 32))
    except ValueError as e:
        parser.error(str(e))
    if args.run_dir is None:
        args.run_dir = os.path.join(args.checkpoint_dir, f"main_cifar_baseline_arch_{args.arch}_dataset_"
                                                         f"{args.dataset}_seed{args.manual_seed}")
    device = torch.device(args.device)
    train_loader, test_loader = cifar_loaders(args, device)
    model = model.to(device)
    forward_model = prepare_model(model, args)  # channels_last / compiled; `model` keeps the plain state dict
    optimizer = torch.optim.SGD(model.parameters(), lr=args.init_lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    logger = RunLogger(args.run_dir, args, script=SCRIPT, quiet=args.quiet, device=device)
    ckpt_path, best_path = os.path.join(args.run_dir, CHECKPOINT_NAME), os.path.join(args.run_dir, "best.pt")
    run_meta = {"script": SCRIPT, "arch": args.arch}
    logger.print(f"Arch: {args.arch}, Params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")

    if args.evaluate:
        ckpt = load_checkpoint(args.evaluate_checkpoint or best_path, expect_meta={"arch": args.arch})
        load_state_dict_checked(model, ckpt["net"])
        record = evaluate_single(forward_model, test_loader, device, args.eval_batches, logger.progress)
        logger.print(" ".join(f"{k} {v:.4f}" for k, v in record.items()))
        return record

    start_epoch, epoch_resume, best = 0, None, {"acc": -1.0, "epoch": 0}
    if args.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, expect_meta=run_meta, map_location=device, restore_rng=True)
        load_state_dict_checked(model, ckpt["net"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if args.data_on_device and ckpt.get("train_loader") is not None:  # its shuffle/augmentation generator
            train_loader.load_state_dict(ckpt["train_loader"])
        start_epoch, epoch_resume, best = ckpt["epoch"], ckpt.get("epoch_state"), ckpt["best"]
        logger.truncate_after(start_epoch)

    guard = FiniteGuard()

    def save(epoch, epoch_state=None):
        guard.check(f"epoch {epoch + 1}", ckpt_path if os.path.exists(ckpt_path) else None)
        loader_state = {"train_loader": train_loader.state_dict()} if args.data_on_device else {}
        save_checkpoint(ckpt_path, {"net": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                                    "epoch_state": epoch_state, "best": best, **loader_state}, meta=run_meta)

    kill_at = int(os.environ.get("MCL_KILL_AT_STEP", "0"))  # tests: SIGKILL after this global step
    step_global = start_epoch * len(train_loader) + (epoch_resume or {}).get("step", 0)
    record = {}
    for epoch in range(start_epoch, args.epochs):
        lr = lr_at_epoch(args, epoch)
        set_lr([optimizer], lr)
        model.train()
        timer, acc = Timer(), AccuracyMeter((1,))
        # sum of loss x batch size on the device, read at the epoch end (float64: the same bits as the former
        # per-step loss.item() meter)
        loss_sum, samples = torch.zeros((), dtype=torch.float64, device=device), 0
        if args.data_on_device:  # the device loader draws from its own generator: replay the epoch from its start
            if epoch_resume:
                train_loader.load_state_dict(epoch_resume["train_loader"])
            loader_at_epoch_start = train_loader.state_dict()
        batches = ResumableEpoch(train_loader, resume=epoch_resume)
        if epoch_resume:
            m = epoch_resume["meters"]
            loss_sum, samples = m["loss_sum"].to(device), m["samples"]
            vars(acc).update(m["acc"])
        epoch_resume = None
        total = min(len(train_loader), args.steps_per_epoch) if args.steps_per_epoch else len(train_loader)
        for step, (x, y) in logger.progress(batches, desc=f"epoch {epoch + 1}/{args.epochs}", total=total):
            if args.steps_per_epoch and step >= args.steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, logits = baseline_step(forward_model, optimizer, x, y, autocast=lambda: autocast(args, device))
            guard.update(loss)
            loss_sum += loss.detach().double() * x.size(0)
            samples += x.size(0)
            acc.update(logits, y)
            if args.save_every_steps and (step + 1) % args.save_every_steps == 0:
                epoch_state = dict(batches.state(step + 1), meters={"loss_sum": loss_sum, "samples": samples,
                                                                    "acc": dict(vars(acc))})
                if args.data_on_device:
                    epoch_state["train_loader"] = loader_at_epoch_start
                save(epoch, epoch_state)
            step_global += 1
            if kill_at and step_global == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        train_seconds = timer.elapsed()
        train_loss = loss_sum.item() / max(samples, 1)
        test = evaluate_single(forward_model, test_loader, device, args.eval_batches, logger.progress)
        if test["test/net/top1"] > best["acc"]:
            best.update(acc=test["test/net/top1"], epoch=epoch + 1)
            save_checkpoint(best_path, {"net": model.state_dict(), "epoch": epoch + 1, "acc": best["acc"]},
                            meta={"arch": args.arch})
        record = {"epoch": epoch + 1, "lr": lr, "epoch_time": timer.elapsed(),
                  "images_per_s": samples / max(train_seconds, 1e-9), "train/loss": train_loss,
                  "train/net/top1": acc.per_sample()[1], **test}
        save(epoch + 1)
        logger.log_epoch(record)
        logger.print(f"epoch {epoch + 1}/{args.epochs} lr {lr:.5f} train loss {train_loss:.4f} "
                     f"test top-1 {test['test/net/top1']:.2f} (best {best['acc']:.2f}, epoch {best['epoch']})")
    logger.finish({"best_top1": best["acc"], "best_epoch": best["epoch"], "last": record})
    return record


if __name__ == "__main__":
    main()
