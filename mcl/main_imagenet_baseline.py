"""One ImageNet network trained alone with cross-entropy (the baselines of the L-MCL ImageNet table), as the authors'
main_imagenet_baseline.py: global batch 256, SGD momentum 0.9 (no Nesterov), wd 1e-4, lr 0.1 x0.1 at epochs 30/60/90,
100 epochs, RandomResizedCrop(224) + flip / Resize(256) + CenterCrop(224).

    cd mcl && torchrun --nproc_per_node 2 main_imagenet_baseline.py --arch resnet34_imagenet --data-root IMAGENET
    python main_imagenet_baseline.py ...        # one process (CPU or one GPU), same global batch

The global --batch-size is split over the processes; checkpoints and logs are written by rank 0 only; test numbers are
all-reduced over the whole val set.
"""
import argparse
import os

import torch
import torch.nn.functional as F

from common.checkpoint import CHECKPOINT_NAME, ResumableEpoch, load_checkpoint, load_state_dict_checked, rng_state, \
    save_checkpoint
from common.distributed import cleanup, init_distributed, wrap_ddp
from common.logging import FiniteGuard, RunLogger, add_common_args
from common.meters import Timer, topk_correct
from mcl.models import IMAGENET_BASELINES, build_imagenet_baseline
from mcl.train_utils import add_imagenet_args, check_positive, evaluate_heads, imagenet_data, lr_at_epoch, \
    reduce_sums, seed_epoch, set_lr

SCRIPT = "mcl/main_imagenet_baseline.py"


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="imagenet", help="only names the run folder")
    p.add_argument("--arch", default="resnet34_imagenet", help="network: " + ", ".join(IMAGENET_BASELINES))
    p.add_argument("--init-lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-type", default="multistep", choices=["cosine", "multistep"])
    p.add_argument("--milestones", type=int, nargs="+", default=[30, 60, 90])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256, help="global batch, split over the processes")
    p.add_argument("--num-workers", type=int, default=16, help="loader processes per training process")
    p.add_argument("--gpu-id", default="0", help="accepted for compatibility; torchrun picks the GPUs")
    p.add_argument("--manual_seed", "--seed", dest="manual_seed", type=int, default=0)
    p.add_argument("--evaluate", "-e", action="store_true", help="only test --evaluate-checkpoint")
    p.add_argument("--evaluate-checkpoint", default=None, help="default: <run-dir>/best.pt")
    p.add_argument("--checkpoint-dir", default="./checkpoint", help="parent of the default run folder")
    add_imagenet_args(p)
    add_common_args(p, data_root_default="./data/ImageNet/", data_root_flags=("--data-root", "--data"))
    return p


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, ["epochs", "batch_size", "image_size"])
    if args.arch not in IMAGENET_BASELINES:
        parser.error(f"unknown --arch {args.arch!r}; valid: {', '.join(IMAGENET_BASELINES)}")
    ctx = init_distributed(args.device)
    if args.batch_size % ctx.world_size:
        parser.error(f"--batch-size {args.batch_size} (global) is not divisible by {ctx.world_size} processes")
    if args.run_dir is None:
        args.run_dir = os.path.join(args.checkpoint_dir, f"main_imagenet_baseline_arch_{args.arch}_dataset_"
                                                         f"{args.dataset}_seed{args.manual_seed}")
    train_set, train_loader, val_loader = imagenet_data(args, ctx)
    torch.manual_seed(args.manual_seed)  # the same initial weights in every process
    model = build_imagenet_baseline(args.arch, len(train_set.classes)).to(ctx.device)
    ddp_model = wrap_ddp(model, ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.init_lr, momentum=0.9, weight_decay=args.weight_decay)
    logger = RunLogger(args.run_dir, args, script=SCRIPT, enabled=ctx.is_main, quiet=args.quiet, device=ctx.device)
    ckpt_path, best_path = os.path.join(args.run_dir, CHECKPOINT_NAME), os.path.join(args.run_dir, "best.pt")
    run_meta = {"script": SCRIPT, "arch": args.arch, "num_classes": len(train_set.classes)}
    logger.print(f"Arch: {args.arch}, Params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, "
                 f"{ctx.world_size} process(es) x batch {args.batch_size // ctx.world_size}")

    if args.evaluate:
        ckpt = load_checkpoint(args.evaluate_checkpoint or best_path, expect_meta={"arch": args.arch})
        load_state_dict_checked(model, ckpt["net"])
        record = evaluate_heads(model, val_loader, ctx, args.eval_batches, logger.progress, single=True)
        logger.print(" ".join(f"{k} {v:.4f}" for k, v in record.items()))
        cleanup(ctx)
        return record

    start_epoch, resume_step, resume_meters, best = 0, 0, None, {"acc": -1.0, "epoch": 0}
    if args.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, expect_meta=run_meta, map_location=ctx.device)
        load_state_dict_checked(model, ckpt["net"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best = ckpt["epoch"], ckpt["best"]
        epoch_state = ckpt["epoch_state"] or {}
        resume_step, resume_meters = epoch_state.get("step", 0), epoch_state.get("sums") if ctx.is_main else None
        logger.truncate_after(start_epoch)
        logger.print(f"resumed from {ckpt_path} at epoch {start_epoch}, step {resume_step}")

    guard = FiniteGuard()

    def save(epoch, epoch_state=None):
        guard.check(f"epoch {epoch + 1}", ckpt_path if os.path.exists(ckpt_path) else None)
        if ctx.is_main:
            save_checkpoint(ckpt_path, {"net": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "epoch": epoch, "epoch_state": epoch_state, "best": best}, meta=run_meta)

    record = {}
    for epoch in range(start_epoch, args.epochs):
        lr = lr_at_epoch(args, epoch)
        set_lr([optimizer], lr)
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        seed_epoch(args.manual_seed, ctx.rank, epoch)
        model.train()
        timer = Timer()
        # this process's CE sum, top-1 count, samples: on the device in float64 (the same bits as the former
        # per-step .item() sums), all-reduced only at save points and the epoch end
        sums = torch.zeros(3, dtype=torch.float64, device=ctx.device) if resume_meters is None else \
            torch.as_tensor(resume_meters, dtype=torch.float64, device=ctx.device)
        batches = ResumableEpoch(train_loader, resume={"step": resume_step, "epoch_rng": rng_state()})
        resume_step, resume_meters = 0, None
        total = min(len(train_loader), args.steps_per_epoch) if args.steps_per_epoch else len(train_loader)
        for step, (x, y) in logger.progress(batches, desc=f"epoch {epoch + 1}/{args.epochs}", total=total):
            if args.steps_per_epoch and step >= args.steps_per_epoch:
                break
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            _, logits = ddp_model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            guard.update(loss)
            samples = sums.new_full((), y.size(0))  # a fill, not a host-to-device copy
            sums += torch.stack([loss.detach().double() * y.size(0), topk_correct(logits, y, (1,))[0].double(),
                                 samples])
            if args.save_every_steps and (step + 1) % args.save_every_steps == 0:
                # totals over processes so far: rank 0 resumes from them, the others from zero
                save(epoch, {"step": step + 1, "sums": reduce_sums(sums, ctx)})
        train_seconds = timer.elapsed()
        loss_sum, correct, images = reduce_sums(sums, ctx)
        test = evaluate_heads(model, val_loader, ctx, args.eval_batches, logger.progress, single=True)
        if test["test/net/top1"] > best["acc"]:
            best.update(acc=test["test/net/top1"], epoch=epoch + 1)
            if ctx.is_main:
                save_checkpoint(best_path, {"net": model.state_dict(), "epoch": epoch + 1, "acc": best["acc"]},
                                meta={"arch": args.arch})
        record = {"epoch": epoch + 1, "lr": lr, "epoch_time": timer.elapsed(),
                  "images_per_s": images / max(train_seconds, 1e-9), "train/loss": loss_sum / max(images, 1),
                  "train/net/top1": 100 * correct / max(images, 1), **test}
        save(epoch + 1)
        logger.log_epoch(record)
        logger.print(f"epoch {epoch + 1}/{args.epochs} lr {lr:.5f} train loss {record['train/loss']:.4f} "
                     f"test top-1 {test['test/net/top1']:.2f} (best {best['acc']:.2f}, epoch {best['epoch']})")
    logger.finish({"best_top1": best["acc"], "best_epoch": best["epoch"], "last": record})
    cleanup(ctx)
    return record


if __name__ == "__main__":
    main()
