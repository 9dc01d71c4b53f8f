"""L-MCL on ImageNet (Yang et al., TPAMI 2023), as the authors' main_layer_mcl_imagenet_meta.py: two networks with
three auxiliary branches each (4 heads), contrast against per-network memory banks (mcl/memory_bank.py), the
aggregator with logit KD, and the meta-learned loss-weight network (every --meta-freq iterations).

    cd mcl && torchrun --nproc_per_node 2 main_layer_mcl_imagenet_meta.py --arch lmcl_resnet34_imagenet \
        --data-root IMAGENET --run-dir runs/r34_lmcl       # the authors' command: 2 processes x 128
    python main_layer_mcl_imagenet_meta.py ...            # one process, same global batch

The pair, the embed heads and the aggregator are DDP-wrapped (the released code left the last two unwrapped, so
their copies drifted apart between GPUs); the hypergradient of the weight network is averaged over processes; the
memory is updated with the embeddings of every process, so all copies stay identical.
"""
import argparse
import os

import torch

from common.checkpoint import CHECKPOINT_NAME, ResumableEpoch, load_checkpoint, load_state_dict_checked, rng_state, \
    save_checkpoint
from common.distributed import cleanup, init_distributed, wrap_ddp
from common.logging import FiniteGuard, RunLogger, add_common_args
from common.meters import Timer, topk_correct
from mcl.lmcl import LOSS_LOG, make_optimizers, training_loss
from mcl.memory_bank import ContrastiveIndices, MemoryBank, MemoryBankContrast, MemoryBankMetaStep
from mcl.models import IMAGENET_PAIRS, Aggregator, EmbedHeads, LossWeightNetwork, build_imagenet_pair
from mcl.train_utils import add_imagenet_args, check_positive, evaluate_heads, head_names, imagenet_data, \
    lr_at_epoch, reduce_sums, seed_epoch, set_lr, sync_buffers

SCRIPT = "mcl/main_layer_mcl_imagenet_meta.py"


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="imagenet", help="only names the run folder")
    p.add_argument("--arch", default="lmcl_resnet18_imagenet", help="pair: " + ", ".join(IMAGENET_PAIRS))
    p.add_argument("--init-lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="all three optimizers (hard-coded by the authors)")
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
    p.add_argument("--times", type=int, default=2, help="virtual steps on the weighted MCL loss per meta update")
    p.add_argument("--meta-freq", type=int, default=500, help="meta update when batch index %% meta-freq == 0")
    p.add_argument("--number-net", type=int, default=2, help="networks of a homogeneous pair")
    p.add_argument("--kd_T", type=float, default=3.0, help="temperature of every KL term")
    p.add_argument("--tau", type=float, default=0.07, help="contrast temperature")
    p.add_argument("--alpha", type=float, default=0.01, help="weight of VCL")
    p.add_argument("--gamma", type=float, default=1.0, help="weight of soft VCL")
    p.add_argument("--beta", type=float, default=0.01, help="weight of ICL")
    p.add_argument("--lam", type=float, default=1.0, help="weight of soft ICL")
    p.add_argument("--rep-dim", type=int, default=1024, help="overwritten by the pair's head width")
    p.add_argument("--feat-dim", type=int, default=128, help="embed-head output and memory width")
    p.add_argument("--pos_k", type=int, default=1, help="same-class memory slots per anchor")
    p.add_argument("--neg_k", type=int, default=8192, help="other-class memory slots per anchor")
    p.add_argument("--nce_m", type=float, default=0.5, help="memory momentum (weight of the old slot)")
    p.add_argument("--fixed-meta-grad", action="store_true",
                   help="exact hypergradient (wd * alpha1 in the adjoint recursion) instead of the authors' "
                        "coefficient 1 (spec 3.7)")
    p.add_argument("--vcl-own-memory", action="store_true",
                   help="the second VCL term reads the other network's memory (the released code reads the first "
                        "network's memory for both)")
    add_imagenet_args(p)
    add_common_args(p, data_root_default="./data/ImageNet/", data_root_flags=("--data-root", "--data"))
    return p


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, ["epochs", "batch_size", "times", "meta_freq", "feat_dim", "kd_T", "tau",
                                  "pos_k", "neg_k", "image_size"])
    if args.arch not in IMAGENET_PAIRS:
        parser.error(f"unknown --arch {args.arch!r}; valid: {', '.join(IMAGENET_PAIRS)}")
    if not 0 <= args.nce_m < 1:
        parser.error(f"--nce_m {args.nce_m} must be in [0, 1)")
    ctx = init_distributed(args.device)
    if args.batch_size % ctx.world_size:
        parser.error(f"--batch-size {args.batch_size} (global) is not divisible by {ctx.world_size} processes")
    if args.run_dir is None:
        args.run_dir = os.path.join(args.checkpoint_dir, f"main_layer_mcl_imagenet_meta_{args.arch}_"
                                                         f"{args.manual_seed}")
    train_set, train_loader, val_loader = imagenet_data(
        args, ctx, wrap_train=lambda ds: ContrastiveIndices(ds, args.pos_k, args.neg_k))
    num_classes = len(train_set.classes)

    torch.manual_seed(args.manual_seed)  # the same initial modules and memory in every process
    pair = build_imagenet_pair(args.arch, num_classes, args.number_net).to(ctx.device)
    with torch.no_grad():  # widths of every head, as the authors derive them
        features, _ = pair.eval()(torch.zeros(2, 3, args.image_size, args.image_size, device=ctx.device))
    args.number_stage = len(features[0])
    rep_dim = [f[0].size(1) for f in features]
    args.rep_dim = rep_dim
    feat_dims = [[h.size(1) for h in f] for f in features]
    weight_net = LossWeightNetwork(feat_dims).to(ctx.device)
    embed_heads = EmbedHeads(rep_dim, args.number_stage, args.feat_dim).to(ctx.device)
    aggregator = Aggregator(rep_dim, args.number_stage).to(ctx.device)
    memory = MemoryBank(len(features), len(train_set), args.feat_dim, args.nce_m).to(ctx.device)
    ddp_pair, ddp_embed, ddp_aggregator = (wrap_ddp(m, ctx) for m in (pair, embed_heads, aggregator))
    names = head_names(len(features), args.number_stage)

    optimizer, weight_optimizer = make_optimizers(pair, embed_heads, aggregator, weight_net, args)
    meta = MemoryBankMetaStep(pair, embed_heads, weight_net, memory, args, ctx, exact=args.fixed_meta_grad)
    modules = {"net": pair, "criterion_mcl": embed_heads, "aggregator": aggregator, "loss_weight_network": weight_net,
               "memory": memory}

    logger = RunLogger(args.run_dir, args, script=SCRIPT, enabled=ctx.is_main, quiet=args.quiet, device=ctx.device)
    ckpt_path, best_path = os.path.join(args.run_dir, CHECKPOINT_NAME), os.path.join(args.run_dir, "best.pt")
    run_meta = {"script": SCRIPT, "arch": args.arch, "num_classes": num_classes, "number_net": len(features),
                "fixed_meta_grad": args.fixed_meta_grad, "vcl_own_memory": args.vcl_own_memory}
    logger.print(f"Arch: {args.arch}, Params: {sum(p.numel() for p in pair.parameters()) / 1e6:.2f}M (pair with "
                 f"auxiliary branches), {ctx.world_size} process(es) x batch {args.batch_size // ctx.world_size}")

    if args.evaluate:
        ckpt = load_checkpoint(args.evaluate_checkpoint or best_path, expect_meta={"arch": args.arch})
        load_state_dict_checked(pair, ckpt["net"], "pair")
        record = evaluate_heads(pair, val_loader, ctx, args.eval_batches, logger.progress)
        logger.print(" ".join(f"{k} {v:.4f}" for k, v in record.items()))
        cleanup(ctx)
        return record

    start_epoch, resume_step, resume_sums = 0, 0, None
    best = {"acc": -1.0, "per_net": [-1.0] * len(features), "epoch": 0}
    if args.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, expect_meta=run_meta, map_location=ctx.device)
        for key, module in modules.items():
            load_state_dict_checked(module, ckpt[key], key)
        optimizer.load_state_dict(ckpt["optimizer"])
        weight_optimizer.load_state_dict(ckpt["weight_optimizer"])
        start_epoch, best = ckpt["epoch"], ckpt["best"]
        epoch_state = ckpt["epoch_state"] or {}
        resume_step, resume_sums = epoch_state.get("step", 0), epoch_state.get("sums") if ctx.is_main else None
        logger.truncate_after(start_epoch)
        logger.print(f"resumed from {ckpt_path} at epoch {start_epoch}, step {resume_step}")

    guard = FiniteGuard()

    def save(epoch, epoch_state=None):
        guard.check(f"epoch {epoch + 1}", ckpt_path if os.path.exists(ckpt_path) else None)
        sync_buffers(pair, ctx)  # rank 0's BN statistics are the ones saved and used from here on
        if ctx.is_main:
            state = {key: module.state_dict() for key, module in modules.items()}
            state.update(optimizer=optimizer.state_dict(), weight_optimizer=weight_optimizer.state_dict(),
                         epoch=epoch, epoch_state=epoch_state, best=best)
            save_checkpoint(ckpt_path, state, meta=run_meta)

    # per-process sums of the epoch: weighted loss terms, top-1 counts of every head and aggregate, samples
    sum_names = [name for name, _, _ in LOSS_LOG] + [n for row in names for n in row] + \
        [f"net{i + 1}/aggregated" for i in range(len(names))] + ["samples"]
    # the logged weight of every LOSS_LOG term, in float64 as the Python floats the authors multiplied by
    loss_weights = torch.tensor([getattr(args, w) if isinstance(w, str) else w for _, _, w in LOSS_LOG],
                                dtype=torch.float64, device=ctx.device)
    record = {}
    for epoch in range(start_epoch, args.epochs):
        lr = lr_at_epoch(args, epoch)
        set_lr([optimizer, weight_optimizer], lr)
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        seed_epoch(args.manual_seed, ctx.rank, epoch)
        pair.train(), embed_heads.train(), aggregator.train()
        timer = Timer()
        # kept on the device in float64 (the same bits as the former per-step .item() sums); all-reduced only at
        # save points and the epoch end
        sums = torch.zeros(len(sum_names), dtype=torch.float64, device=ctx.device) if resume_sums is None else \
            torch.as_tensor(resume_sums, dtype=torch.float64, device=ctx.device)
        batches = ResumableEpoch(train_loader, resume={"step": resume_step, "epoch_rng": rng_state()})
        resume_step, resume_sums = 0, None
        total = min(len(train_loader), args.steps_per_epoch) if args.steps_per_epoch else len(train_loader)
        for step, (x, y, contrast_idx) in logger.progress(batches, desc=f"epoch {epoch + 1}/{args.epochs}",
                                                          total=total):
            if args.steps_per_epoch and step >= args.steps_per_epoch:
                break
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            contrast_idx = contrast_idx.to(ctx.device, non_blocking=True)
            contrast = MemoryBankContrast(memory, contrast_idx, args)
            optimizer.zero_grad()
            out = training_loss(ddp_pair, ddp_embed, ddp_aggregator, weight_net, x, y, args, contrast=contrast)
            out["total"].backward()
            optimizer.step()
            contrast.update_memory_(out["embeddings"], ctx)  # final heads of every process, after the loss
            guard.update(out["total"])
            terms = torch.stack([out[key].detach() for _, key, _ in LOSS_LOG]).double()
            heads = [z for net in out["logits"] for z in net] + list(out["aggregated_logits"])
            correct = torch.stack([topk_correct(z, y, (1,))[0] for z in heads]).double()
            samples = sums.new_full((1,), y.size(0))  # a fill, not a host-to-device copy
            sums += torch.cat([loss_weights * terms * y.size(0), correct, samples])
            if step % args.meta_freq == 0:
                meta.step(x, y, lr, weight_optimizer, contrast_idx=contrast_idx)
            if args.save_every_steps and (step + 1) % args.save_every_steps == 0:
                # totals over processes so far: rank 0 resumes from them, the others from zero
                save(epoch, {"step": step + 1, "sums": reduce_sums(sums, ctx)})
        train_seconds = timer.elapsed()
        totals = dict(zip(sum_names, reduce_sums(sums, ctx)))
        images = max(totals["samples"], 1)

        sync_buffers(pair, ctx)
        test = evaluate_heads(pair, val_loader, ctx, args.eval_batches, logger.progress)
        if test["test/max_heads/top1"] > best["acc"]:  # the authors select on the max over every head
            best.update(acc=test["test/max_heads/top1"], epoch=epoch + 1)
            if ctx.is_main:
                save_checkpoint(best_path, {"net": pair.state_dict(), "epoch": epoch + 1, "acc": best["acc"]},
                                meta={"arch": args.arch})
        best["per_net"] = [max(b, test[f"test/net{i + 1}/max_heads/top1"]) for i, b in enumerate(best["per_net"])]
        record = {"epoch": epoch + 1, "lr": lr, "epoch_time": timer.elapsed(),
                  "images_per_s": totals["samples"] / max(train_seconds, 1e-9)}
        record.update({f"train/{name}": totals[name] / images for name, _, _ in LOSS_LOG})
        record.update({f"train/{name}/top1": 100 * totals[name] / images for name in sum_names[len(LOSS_LOG):-1]})
        record.update(test)
        save(epoch + 1)
        logger.log_epoch(record)
        logger.print(f"epoch {epoch + 1}/{args.epochs} lr {lr:.5f} train loss {record['train/loss']:.4f} | test top-1 "
                     + " ".join(f"{n} {test[f'test/{n}/top1']:.2f}" for row in names for n in row)
                     + f" | best max-over-heads {best['acc']:.2f} (epoch {best['epoch']})")
    logger.finish({"best_max_heads_top1": best["acc"], "best_epoch": best["epoch"],
                   "best_max_heads_top1_per_net": best["per_net"], "last": record})
    cleanup(ctx)
    return record


if __name__ == "__main__":
    main()
