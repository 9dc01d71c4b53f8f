"""L-MCL on CIFAR-100: two networks with auxiliary branches, layer-wise mutual contrastive learning weighted by a
meta-learned loss-weight network (Yang et al., TPAMI 2023), as the authors' main_layer_mcl_cifar_meta.py.

    cd mcl && python main_layer_mcl_cifar_meta.py --arch lmcl_resnet32_cifar --data-root ./data --run-dir runs/r32
    python -m mcl.main_layer_mcl_cifar_meta --arch lmcl_res32_res110_cifar ...

Every iteration: one SGD step on L = L_cls + L_kd + L_MCL; every --meta-freq iterations, on the same batch, the
meta step (two virtual steps on the weighted L_MCL, one on the head CEs, second-order hypergradient into the
loss-weight network, networks left as they were). Epoch-wise cosine lr shared by all optimizers.
"""
import argparse
import os
import signal
from functools import partial

import numpy as np
import torch

from common.checkpoint import CHECKPOINT_NAME, ResumableEpoch, load_checkpoint, load_state_dict_checked, \
    save_checkpoint
from common.data import ClassBalancedSampler, cifar_datasets, cifar_test_transform, cifar_train_transform, make_loader
from common.fast import DeviceCifarLoader, add_fast_args, autocast, prepare_model, resolve_fast_args
from common.logging import FiniteGuard, RunLogger, add_common_args
from common.meters import AccuracyMeter, Timer
from mcl.lmcl import LOSS_LOG, MetaStep, make_optimizers, train_step
from mcl.models import CIFAR_PAIRS, Aggregator, EmbedHeads, LossWeightNetwork, build_cifar_pair
from mcl.train_utils import LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD, build_as_released, check_positive, evaluate_pair, \
    head_names, lr_at_epoch, set_lr

SCRIPT = "mcl/main_layer_mcl_cifar_meta.py"


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar100", help="only names the run folder; the data is CIFAR-100")
    p.add_argument("--arch", default="lmcl_resnet32_cifar", help="pair: " + ", ".join(CIFAR_PAIRS))
    p.add_argument("--init-lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4, help="on every parameter, all three optimizers")
    p.add_argument("--lr-type", default="cosine", choices=["cosine", "multistep"])
    p.add_argument("--milestones", type=int, nargs="+", default=[150, 225])
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128, help="train and test; 2 images of batch/2 classes")
    p.add_argument("--num-workers", type=int, default=8, help="loader processes (the authors' code ignored it)")
    p.add_argument("--gpu-id", default="0", help="accepted for compatibility; use --device")
    p.add_argument("--manual_seed", "--seed", dest="manual_seed", type=int, default=0)
    p.add_argument("--evaluate", "-e", action="store_true", help="only test --evaluate-checkpoint")
    p.add_argument("--evaluate-checkpoint", default=None, help="default: <run-dir>/best.pt")
    p.add_argument("--checkpoint-dir", default="./checkpoint", help="parent of the default run folder")
    p.add_argument("--times", type=int, default=2, help="virtual steps on the weighted MCL loss per meta update")
    p.add_argument("--meta-freq", type=int, default=50, help="meta update when batch index %% meta-freq == 0")
    p.add_argument("--number-net", type=int, default=2, help="networks of a homogeneous pair")
    p.add_argument("--kd_T", type=float, default=3.0, help="temperature of every KL term")
    p.add_argument("--tau", type=float, default=0.1, help="contrast temperature")
    p.add_argument("--alpha", type=float, default=0.1, help="weight of VCL")
    p.add_argument("--gamma", type=float, default=1.0, help="weight of soft VCL")
    p.add_argument("--beta", type=float, default=0.1, help="weight of ICL")
    p.add_argument("--lam", type=float, default=1.0, help="weight of soft ICL")
    p.add_argument("--feat-dim", type=int, default=128, help="embed-head output width")
    p.add_argument("--number-stage", type=int, default=3, help="overwritten by the number of heads of the pair")
    p.add_argument("--fixed-meta-grad", action="store_true",
                   help="exact hypergradient (wd * alpha1 in the adjoint recursion) instead of the authors' "
                        "coefficient 1 (spec 3.7)")
    add_common_args(p, data_root_default="./data/", data_root_flags=("--data-root", "--data"))
    add_fast_args(p)
    return p


def cifar_loaders(args, device):
    """(train loader, test loader, class-balanced sampler): the authors' PIL pipeline (zero-pad crop then flip, their
    mean/std) with --num-workers processes, or with --data-on-device the same sampler and augmentation on the device."""
    train_set, test_set = cifar_datasets(
        "CIFAR100", args.data_root, cifar_train_transform(LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD, "constant", "crop_flip"),
        cifar_test_transform(LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD), flag="--data-root")
    sampler = ClassBalancedSampler(train_set.targets, m=2, batch_size=args.batch_size)
    if args.data_on_device:
        cifar = dict(device=device, mean=LMCL_CIFAR100_MEAN, std=LMCL_CIFAR100_STD, padding_mode="constant",
                     order="crop_flip", channels_last=args.channels_last)
        return (DeviceCifarLoader(train_set, args.batch_size, train=True, sampler=sampler, seed=args.manual_seed,
                                  **cifar), DeviceCifarLoader(test_set, args.batch_size, train=False, **cifar), sampler)
    pin = device.type == "cuda"
    return (make_loader(train_set, args.batch_size, sampler=sampler, workers=args.num_workers, pin_memory=pin),
            make_loader(test_set, args.batch_size, workers=args.num_workers, pin_memory=pin), sampler)


def build_modules(args, device):
    """The pair and its loss-side modules from the seeded RNG in the authors' order: the pair (build_as_released),
    their width probe through it in eval mode, then the loss-weight network, the embed heads and the aggregator.
    Sets args.number_stage, args.rep_dim and args.feat_dims from the probe, as they do. Returns (pair, embed_heads,
    aggregator, weight_net)."""
    pair, probe = build_as_released(partial(build_cifar_pair, args.arch, 100, args.number_net), (1, 3, 32, 32))
    pair = pair.to(device)
    with torch.no_grad():
        pair.eval()
        features, _ = pair(probe.to(device))
    args.number_stage = len(features[0])
    args.rep_dim = [f[0].size(1) for f in features]  # every head of a network is as wide as its first (spec 5.2-7)
    args.feat_dims = [[h.size(1) for h in f] for f in features]
    weight_net = LossWeightNetwork(args.feat_dims).to(device)
    embed_heads = EmbedHeads(args.rep_dim, args.number_stage, args.feat_dim).to(device)
    aggregator = Aggregator(args.rep_dim, args.number_stage).to(device)
    return pair, embed_heads, aggregator, weight_net


def main(argv=None):
    parser = get_parser()
    args = resolve_fast_args(parser.parse_args(argv))
    check_positive(parser, args, ["epochs", "batch_size", "times", "meta_freq", "feat_dim", "kd_T", "tau"])
    if args.batch_size % 2 or args.batch_size // 2 > 100:
        parser.error(f"--batch-size {args.batch_size}: the sampler takes 2 images of batch/2 distinct classes, so it "
                     f"must be even and at most 200 for CIFAR-100")
    if args.num_workers < 0:
        parser.error("--num-workers must be >= 0")
    np.random.seed(args.manual_seed)
    torch.manual_seed(args.manual_seed)
    device = torch.device(args.device)
    try:
        pair, embed_heads, aggregator, weight_net = build_modules(args, device)
    except ValueError as e:
        parser.error(str(e))
    if args.run_dir is None:
        args.run_dir = os.path.join(args.checkpoint_dir, f"main_layer_mcl_cifar_meta_arch_{args.arch}_dataset_"
                                                         f"{args.dataset}_seed{args.manual_seed}")

    train_loader, test_loader, sampler = cifar_loaders(args, device)
    number_net = len(args.rep_dim)
    names = head_names(number_net, args.number_stage)
    # the pair as called in the ordinary step and the test (channels_last / compiled on the fast path); `pair` stays
    # the plain module: checkpoints, the meta step (never compiled) and the optimizers use it
    forward_pair = prepare_model(pair, args)

    optimizer, weight_optimizer = make_optimizers(pair, embed_heads, aggregator, weight_net, args)
    meta = MetaStep(pair, embed_heads, weight_net, args, exact=args.fixed_meta_grad)
    modules = {"net": pair, "criterion_mcl": embed_heads, "aggregator": aggregator, "loss_weight_network": weight_net}

    logger = RunLogger(args.run_dir, args, script=SCRIPT, quiet=args.quiet, device=device)
    ckpt_path = os.path.join(args.run_dir, CHECKPOINT_NAME)
    best_path = os.path.join(args.run_dir, "best.pt")
    run_meta = {"script": SCRIPT, "arch": args.arch, "number_net": number_net, "fixed_meta_grad": args.fixed_meta_grad}
    n_params = sum(p.numel() for p in pair.parameters())
    logger.print(f"Arch: {args.arch}, Params: {n_params / 1e6:.2f}M (pair with auxiliary branches)")

    if args.evaluate:
        path = args.evaluate_checkpoint or best_path
        ckpt = load_checkpoint(path, expect_meta={"arch": args.arch})
        load_state_dict_checked(pair, ckpt["net"], "pair")
        record = evaluate_pair(forward_pair, test_loader, device, args.eval_batches, logger.progress)
        logger.print(" ".join(f"{k} {v:.4f}" for k, v in record.items()))
        return record

    start_epoch, epoch_resume, best = 0, None, {"acc": -1.0, "per_net": [-1.0] * number_net, "epoch": 0}
    if args.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, expect_meta=run_meta, map_location=device, restore_rng=True)
        for key, module in modules.items():
            load_state_dict_checked(module, ckpt[key], key)
        optimizer.load_state_dict(ckpt["optimizer"])
        weight_optimizer.load_state_dict(ckpt["weight_optimizer"])
        sampler.load_state_dict(ckpt["sampler"])
        if args.data_on_device and ckpt.get("train_loader") is not None:  # its augmentation generator
            train_loader.load_state_dict(ckpt["train_loader"])
        start_epoch, epoch_resume, best = ckpt["epoch"], ckpt.get("epoch_state"), ckpt["best"]
        logger.truncate_after(start_epoch)
        logger.print(f"resumed from {ckpt_path} at epoch {start_epoch}"
                     + (f", step {epoch_resume['step']}" if epoch_resume else ""))

    guard = FiniteGuard()

    def save(epoch, epoch_state=None):
        guard.check(f"epoch {epoch + 1}", ckpt_path if os.path.exists(ckpt_path) else None)
        state = {key: module.state_dict() for key, module in modules.items()}
        state.update(optimizer=optimizer.state_dict(), weight_optimizer=weight_optimizer.state_dict(),
                     sampler=sampler.state_dict(), epoch=epoch, epoch_state=epoch_state, best=best)
        if args.data_on_device:
            state["train_loader"] = train_loader.state_dict()
        save_checkpoint(ckpt_path, state, meta=run_meta)

    kill_at = int(os.environ.get("MCL_KILL_AT_STEP", "0"))  # tests: SIGKILL after this global step
    step_global = start_epoch * len(train_loader) + (epoch_resume or {}).get("step", 0)
    # the logged weight of every LOSS_LOG term, in float64 as the Python floats the authors multiplied by
    loss_weights = torch.tensor([getattr(args, w) if isinstance(w, str) else w for _, _, w in LOSS_LOG],
                                dtype=torch.float64, device=device)
    record = {}
    for epoch in range(start_epoch, args.epochs):
        lr = lr_at_epoch(args, epoch)
        set_lr([optimizer, weight_optimizer], lr)
        pair.train(), embed_heads.train(), aggregator.train()
        timer = Timer()
        # the epoch's sums of weight x term x batch size, kept on the device and read at the epoch end: float64
        # products in the order of the former per-step .item() meters, so the logged means are the same bits
        loss_sums, samples = torch.zeros(len(LOSS_LOG), dtype=torch.float64, device=device), 0
        accs = {name: AccuracyMeter((1,)) for row in names for name in row}
        accs.update({f"net{i + 1}/aggregated": AccuracyMeter((1,)) for i in range(len(names))})
        if args.data_on_device:  # the device loader draws from its own generator: replay the epoch from its start
            if epoch_resume:
                train_loader.load_state_dict(epoch_resume["train_loader"])
            loader_at_epoch_start = train_loader.state_dict()
        batches = ResumableEpoch(train_loader, resume=epoch_resume)
        if epoch_resume:
            m = epoch_resume["meters"]
            loss_sums, samples = m["loss_sums"].to(device), m["samples"]
            for name, state in m["acc"].items():
                vars(accs[name]).update(state)
        epoch_resume = None
        total = min(len(train_loader), args.steps_per_epoch) if args.steps_per_epoch else len(train_loader)
        for step, (x, y) in logger.progress(batches, desc=f"epoch {epoch + 1}/{args.epochs}", total=total):
            if args.steps_per_epoch and step >= args.steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = train_step(forward_pair, embed_heads, aggregator, weight_net, optimizer, x, y, args,
                             autocast=lambda: autocast(args, device))
            guard.update(out["total"])
            terms = torch.stack([out[key].detach() for _, key, _ in LOSS_LOG]).double()
            loss_sums += loss_weights * terms * x.size(0)
            samples += x.size(0)
            for i, row in enumerate(names):
                for j, name in enumerate(row):
                    accs[name].update(out["logits"][i][j], y)
                accs[f"net{i + 1}/aggregated"].update(out["aggregated_logits"][i], y)
            if step % args.meta_freq == 0:
                meta.step(x, y, lr, weight_optimizer)
            step_global += 1
            if args.save_every_steps and (step + 1) % args.save_every_steps == 0:
                epoch_state = dict(batches.state(step + 1), meters={
                    "loss_sums": loss_sums, "samples": samples, "acc": {k: dict(vars(a)) for k, a in accs.items()}})
                if args.data_on_device:
                    epoch_state["train_loader"] = loader_at_epoch_start
                save(epoch, epoch_state)
            if kill_at and step_global == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        train_seconds = timer.elapsed()

        test = evaluate_pair(forward_pair, test_loader, device, args.eval_batches, logger.progress)
        if test["test/max_heads/top1"] > best["acc"]:  # the authors select on the max over every head
            best.update(acc=test["test/max_heads/top1"], epoch=epoch + 1)
            save_checkpoint(best_path, {"net": pair.state_dict(), "epoch": epoch + 1, "acc": best["acc"]},
                            meta={"arch": args.arch})
        best["per_net"] = [max(b, test[f"test/net{i + 1}/max_heads/top1"]) for i, b in enumerate(best["per_net"])]
        record = {"epoch": epoch + 1, "lr": lr, "epoch_time": timer.elapsed(),
                  "images_per_s": samples / max(train_seconds, 1e-9)}
        record.update({f"train/{name}": s / max(samples, 1) for (name, _, _), s in zip(LOSS_LOG, loss_sums.tolist())})
        record.update({f"train/{name}/top1": m.per_sample()[1] for name, m in accs.items()})
        record.update(test)
        save(epoch + 1)
        logger.log_epoch(record)
        logger.print(f"epoch {epoch + 1}/{args.epochs} lr {lr:.5f} train loss {record['train/loss']:.4f} | test top-1 "
                     + " ".join(f"{n} {test[f'test/{n}/top1']:.2f}" for row in names for n in row)
                     + f" | best max-over-heads {best['acc']:.2f} (epoch {best['epoch']})")
    logger.finish({"best_max_heads_top1": best["acc"], "best_epoch": best["epoch"],
                   "best_max_heads_top1_per_net": best["per_net"], "last": record})
    return record


if __name__ == "__main__":
    main()
