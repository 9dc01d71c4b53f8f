"""DCM (Dense Cross-layer Mutual-distillation, Yao & Sun, ECCV 2020) on CIFAR, with the DML and baseline columns.

    cd dcm && python main.py --depth 28 --width 10                     # WRN-28-10 | WRN-28-10, DCM (wrn/main.py)
    cd dcm && python main.py --net2 mobilenet                          # WRN-28-10 | MobileNet, DCM (wrn_mobi/main.py)
    python -m dcm.main --method dml ...                                # two networks, final heads, CE + mutual KL
    python -m dcm.main --method baseline --net2 none ...               # one network trained alone

Every option of the authors' main.py keeps its name, default and meaning; see dcm/README.md. Faithful to the
released code: one SGD over both networks, rebuilt (momentum reset) at each learning-rate drop, the 24-term loss,
reflect padding, CIFAR-10 normalisation constants. Unlike it, every head of both networks is evaluated each epoch,
both networks are checkpointed, and --resume works.
"""
import argparse
import json
import os

import torch
import torch.nn as nn

from common.checkpoint import CHECKPOINT_NAME, ResumableEpoch, load_checkpoint, save_checkpoint
from common.data import cifar_datasets, cifar_test_transform, cifar_train_transform, make_loader
from common.logging import FiniteGuard, RunLogger, add_common_args
from common.meters import AccuracyMeter, AverageMeter, Timer
from dcm.losses import loss_terms, term_names, total_loss
from dcm.mobilenet import MobileNet
from dcm.resnet import WRN, wrn_hyper

SCRIPT = "dcm/main.py"
# The released script normalises CIFAR-100 with these CIFAR-10 statistics too.
MEAN = tuple(v / 255.0 for v in (125.3, 123.0, 113.9))
STD = tuple(v / 255.0 for v in (63.0, 62.1, 66.7))
RELEASED_OPTIONS = ("model", "depth", "width", "dataset", "dataroot", "dtype", "groups", "nthread", "seed",
                    "batch_size", "lr", "epochs", "weight_decay", "epoch_step", "lr_decay_ratio", "resume", "note",
                    "cuda", "save", "ngpu", "gpu_id")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The authors' options (wrn/main.py and wrn_mobi/main.py have the same list and defaults).
    parser.add_argument("--model", default="resnet", type=str, help="only logged, as released")
    parser.add_argument("--depth", default=28, type=int, help="WRN depth (net 1, and net 2 when it is a WRN)")
    parser.add_argument("--width", default=10, type=float, help="WRN widening factor (channels int(16w, 32w, 64w))")
    parser.add_argument("--dataset", default="CIFAR100", type=str, help="CIFAR10 or CIFAR100")
    parser.add_argument("--dtype", default="float", type=str, help="input dtype; only 'float' works, as released")
    parser.add_argument("--groups", default=1, type=int, help="only logged, as released")
    parser.add_argument("--nthread", default=4, type=int, help="DataLoader workers (train and test)")
    parser.add_argument("--seed", default=1, type=int, help="torch.manual_seed, before the networks are built")
    parser.add_argument("--batch_size", default=128, type=int, help="train and test batch size")
    parser.add_argument("--lr", default=0.1, type=float, help="initial learning rate")
    parser.add_argument("--epochs", default=200, type=int)
    parser.add_argument("--weight_decay", default=0.0005, type=float, help="SGD weight decay on every parameter")
    parser.add_argument("--epoch_step", default="[60,120,160]", type=str,
                        help="JSON list of 1-based epochs at whose start the lr is multiplied by --lr_decay_ratio "
                             "and the optimizer rebuilt (momentum reset)")
    parser.add_argument("--lr_decay_ratio", default=0.2, type=float)
    parser.add_argument("--note", default="", type=str, help="only logged, as released")
    parser.add_argument("--cuda", action="store_true", help="unused, as released (see --device)")
    parser.add_argument("--save", default="", type=str,
                        help="output folder (same as --run-dir); default logs/<pair>_<method>_seed<seed>")
    parser.add_argument("--ngpu", default=1, type=int, help="GPUs to split each batch over (nn.DataParallel)")
    parser.add_argument("--gpu_id", default="0", type=str,
                        help="GPU ids (comma-separated); the first one is used with --device cuda")
    # What the two released scripts and the paper's table columns need.
    parser.add_argument("--net2", default="wrn", choices=("wrn", "mobilenet", "none"),
                        help="second network: wrn (wrn/main.py), mobilenet (wrn_mobi/main.py), none (baseline)")
    parser.add_argument("--method", default="dcm", choices=("dcm", "dml", "baseline"),
                        help="dcm: 3 heads per net, 6 CE + 18 cross-network KL; dml: final heads, 2 CE + 2 KL; "
                             "baseline: final heads, CE only (each network trained alone)")
    add_common_args(parser, data_root_default="./data", data_root_flags=("--data-root", "--dataroot"))
    args = parser.parse_args(argv)

    try:
        wrn_hyper(args.depth, args.width)
    except ValueError as e:
        parser.error(str(e))
    if args.dtype != "float":
        parser.error(f"--dtype {args.dtype!r}: the parameters are float32, so only --dtype float can run "
                     f"(the released code broke with any other value)")
    try:
        args.epoch_step = json.loads(args.epoch_step) if isinstance(args.epoch_step, str) else args.epoch_step
        if not isinstance(args.epoch_step, list) or not all(isinstance(e, int) for e in args.epoch_step):
            raise ValueError
    except ValueError:
        parser.error(f"--epoch_step must be a JSON list of integers like '[60,120,160]'; got {args.epoch_step!r}")
    if args.method != "baseline" and args.net2 == "none":
        parser.error(f"--method {args.method} distils between two networks; --net2 none is for --method baseline")
    if args.dataset.upper().replace("-", "") not in ("CIFAR10", "CIFAR100"):
        parser.error(f"--dataset {args.dataset!r}: valid values are CIFAR10, CIFAR100")
    for name in ("batch_size", "epochs", "nthread", "ngpu"):
        if getattr(args, name) < (0 if name == "nthread" else 1):
            parser.error(f"--{name} must be positive; got {getattr(args, name)}")
    args.run_dir = args.run_dir or args.save or os.path.join(
        "logs", f"wrn-{args.depth}-{args.width:g}_{args.net2}_{args.method}_seed{args.seed}")
    return args


def build_networks(args, num_classes):
    """Net 1 (WRN) and net 2 with the released init and CPU-RNG order (seed, WRN init, then net 2)."""
    aux = args.method == "dcm"
    net1 = WRN(args.depth, args.width, num_classes, aux)
    net2 = WRN(args.depth, args.width, num_classes, aux) if args.net2 == "wrn" else None
    torch.manual_seed(args.seed)  # construction above drew default inits; the released init starts here
    net1.reset_parameters_as_released()
    if net2 is not None:
        net2.reset_parameters_as_released()
    elif args.net2 == "mobilenet":
        net2 = MobileNet(num_classes, aux)  # PyTorch default init, continuing the same RNG stream, as released
    return [net for net in (net1, net2) if net is not None]


def net_label(i):
    return f"net{i + 1}"


def term_key(name):
    """'CE(n1.aux1)' -> 'ce/n1.aux1'; 'KL(p[n2.final].detach() || p[n1.aux1])' -> 'kl/n2.final->n1.aux1'."""
    if name.startswith("CE("):
        return "ce/" + name[3:-1]
    teacher, student = name[len("KL(p["):].split("].detach() || p[")
    return f"kl/{teacher}->{student[:-2]}"


def head_keys(nets):
    """[(net index, head index, 'net1', 'net1/aux1' or 'net1'), ...] for every head of every network."""
    keys = []
    for i, net in enumerate(nets):
        for h, head in enumerate(net.head_names()):
            keys.append((i, h, net_label(i) + ("" if head == "final" else f"/{head}")))
    return keys


def batch_norm_buffers(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running_" in k or "num_batches" in k}


def forward_all(models, x):
    return [list(model(x)) for model in models]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(args.gpu_id.split(",")[0]))
    torch.backends.cudnn.benchmark = True  # as released
    num_classes = 10 if args.dataset.upper().replace("-", "") == "CIFAR10" else 100

    torch.manual_seed(args.seed)
    train_set, test_set = cifar_datasets(args.dataset, args.data_root,
                                         cifar_train_transform(MEAN, STD, "reflect", "pad_flip_crop"),
                                         cifar_test_transform(MEAN, STD), download=True, flag="--dataroot")
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, args.batch_size, shuffle=True, workers=args.nthread, pin_memory=pin)
    test_loader = make_loader(test_set, args.batch_size, shuffle=False, workers=args.nthread, pin_memory=pin)

    nets = [net.to(device) for net in build_networks(args, num_classes)]
    archs = ["wrn"] + ([args.net2] if len(nets) > 1 else [])
    models = nets
    if args.ngpu > 1:
        ids = [int(i) for i in args.gpu_id.split(",")] if "," in args.gpu_id else list(range(args.ngpu))
        models = [nn.DataParallel(net, device_ids=ids[: args.ngpu]) for net in nets]
    params = [p for net in nets for p in net.parameters()]  # net 1 then net 2, as released
    n_parameters = sum(p.numel() for p in params)
    distill = args.method != "baseline"

    def make_optimizer(lr):
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=args.weight_decay)

    optimizer = make_optimizer(args.lr)
    logger = RunLogger(args.run_dir, args, script=SCRIPT, quiet=args.quiet, device=device)
    logger.print(f"==> networks: {' | '.join(archs)}, method {args.method}, parameters: "
                 + ", ".join(f"{net_label(i)} {sum(p.numel() for p in n.parameters()):,}" for i, n in enumerate(nets))
                 + f" (total {n_parameters:,})")
    ckpt_path = os.path.join(args.run_dir, CHECKPOINT_NAME)
    log_txt = os.path.join(args.run_dir, "log.txt")
    meta = {"script": SCRIPT, "archs": archs, "depth": args.depth, "width": args.width, "method": args.method,
            "dataset": args.dataset, "batch_size": args.batch_size, "seed": args.seed}
    keys = head_keys(nets)

    start_epoch, epoch_resume, best = 0, None, {}
    if args.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, expect_meta=meta, map_location=device, restore_rng=True)
        for net, state in zip(nets, ckpt["nets"]):
            net.load_state_dict(state)
        optimizer = make_optimizer(ckpt["optimizer"]["param_groups"][0]["lr"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, epoch_resume, best = ckpt["epoch"], ckpt.get("epoch_state"), ckpt.get("best", {})
        logger.truncate_after(start_epoch)
        if os.path.exists(log_txt):
            with open(log_txt) as f:
                lines = [line for line in f if json.loads(line[len("json_stats: "):])["epoch"] <= start_epoch]
            with open(log_txt, "w") as f:
                f.writelines(lines)
        logger.print(f"==> resumed from {ckpt_path} at epoch {start_epoch}"
                     + (f", step {epoch_resume['step']}" if epoch_resume else ""))

    def save(epoch, epoch_state=None):
        guard.check(f"epoch {epoch + 1}", ckpt_path if os.path.exists(ckpt_path) else None)
        save_checkpoint(ckpt_path, {"nets": [net.state_dict() for net in nets], "optimizer": optimizer.state_dict(),
                                    "epoch": epoch, "epoch_state": epoch_state, "best": best}, meta=meta)

    guard = FiniteGuard()
    names, record = None, None
    for epoch in range(start_epoch, args.epochs):
        if epoch_resume is None and epoch + 1 in args.epoch_step:
            # Released schedule: a brand-new SGD with the decayed lr, so the momentum buffers are dropped.
            optimizer = make_optimizer(optimizer.param_groups[0]["lr"] * args.lr_decay_ratio)
        for model in models:
            model.train()
        timer = Timer()
        loss_per_batch, loss_per_sample, term_sums = AverageMeter(), AverageMeter(), None
        train_acc = {k: AccuracyMeter() for _, _, k in keys}
        batches = ResumableEpoch(train_loader, resume=epoch_resume)
        if epoch_resume:  # the epoch's running meters continue where the checkpoint left them
            m = epoch_resume["meters"]
            vars(loss_per_batch).update(m["loss_per_batch"])
            vars(loss_per_sample).update(m["loss_per_sample"])
            term_sums = m["term_sums"].to(device) if m["term_sums"] is not None else None
            for k, state in m["acc"].items():
                vars(train_acc[k]).update({n: (v.to(device) if torch.is_tensor(v) else v) for n, v in state.items()})
        epoch_resume = None
        total = min(len(train_loader), args.steps_per_epoch or len(train_loader))
        progress = logger.progress(batches, desc=f"epoch {epoch + 1}/{args.epochs}", total=total)
        for step, (x, y) in progress:
            if args.steps_per_epoch and step >= args.steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True).long()
            optimizer.zero_grad()
            outputs = forward_all(models, x)  # net 1 then net 2, the same augmented batch
            terms = loss_terms(outputs, y, distill)
            loss = total_loss(terms)
            loss.backward()
            optimizer.step()
            guard.update(loss)
            names = names or term_names(outputs, distill)
            detached = torch.stack([t.detach() for t in terms])
            term_sums = detached * x.size(0) if term_sums is None else term_sums + detached * x.size(0)
            loss_value = loss.item()
            loss_per_batch.update(loss_value)  # the released meter: unweighted mean over batches
            loss_per_sample.update(loss_value, x.size(0))
            for i, h, k in keys:
                train_acc[k].update(outputs[i][h], y)  # pre-update outputs, as released
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(loss=f"{loss_value:.3f}")
            if args.save_every_steps and (step + 1) % args.save_every_steps == 0:
                save(epoch, dict(batches.state(step + 1), meters={
                    "loss_per_batch": vars(loss_per_batch), "loss_per_sample": vars(loss_per_sample),
                    "term_sums": term_sums, "acc": {k: dict(vars(a)) for k, a in train_acc.items()}}))
        guard.check(f"epoch {epoch + 1}", ckpt_path if os.path.exists(ckpt_path) else None)
        train_time = timer.elapsed()

        test = evaluate(models, nets, archs, test_loader, device, args.eval_batches, distill)
        test_time = timer.elapsed() - train_time
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "epoch_time": train_time + test_time,
                  "images_per_s": loss_per_sample.count / max(train_time, 1e-9), "train_time": train_time,
                  "test_time": test_time, "train/loss": loss_per_sample.avg, "train/loss_per_batch": loss_per_batch.avg}
        record.update({f"train/{term_key(n)}": v / loss_per_sample.count
                       for n, v in zip(names, term_sums.tolist())})
        record.update({f"train/{k}/top1": train_acc[k].per_sample()[1] for _, _, k in keys})
        record.update(test)
        for k in [k for k in record if k.startswith("test/") and k.endswith("/top1")]:
            best[k] = max(best.get(k, 0.0), record[k])
            record["best/" + k[len("test/"):]] = best[k]
        save(epoch + 1)
        logger.log_epoch(record)
        write_released_log(log_txt, args, archs, record, num_classes, n_parameters)
        logger.print(f"==> id: {args.run_dir} ({epoch + 1}/{args.epochs}), test_acc: {record['test/net1/top1']:.2f}"
                     + (f", net2 test_acc: {record['test/net2/top1']:.2f}" if len(nets) > 1 else "")
                     + f", train loss {record['train/loss']:.4f}")
    logger.finish({k: v for k, v in (record or {}).items() if k.startswith(("test/", "best/"))})


@torch.no_grad()
def evaluate(models, nets, archs, loader, device, eval_batches, distill):
    """Every head of every network, eval-mode BN; MobileNet also with batch-statistics BN (the released test path).

    The released test loss is the method's loss with the WRNs in eval mode and MobileNet in train mode; its
    per-batch unweighted mean is logged as test/loss. MobileNet's batch-statistics pass would write test data into
    its running statistics (the released code let it, and never used them); they are restored afterwards.
    """
    keys = head_keys(nets)
    acc = {k: AccuracyMeter() for _, _, k in keys}
    ce = {k: AverageMeter() for _, _, k in keys}
    mobile = [i for i, a in enumerate(archs) if a == "mobilenet"]
    batch_stats_acc = {k: AccuracyMeter() for i, _, k in keys if i in mobile}
    saved = {i: batch_norm_buffers(nets[i]) for i in mobile}
    released_loss = AverageMeter()
    for b, (x, y) in enumerate(loader):
        if eval_batches and b >= eval_batches:
            break
        x, y = x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True).long()
        for model in models:
            model.eval()
        outputs = forward_all(models, x)
        released = list(outputs)
        for i in mobile:
            models[i].train()
            released[i] = list(models[i](x))
            models[i].eval()
        for i, h, k in keys:
            acc[k].update(outputs[i][h], y)
            ce[k].update(nn.functional.cross_entropy(outputs[i][h].float(), y).item(), x.size(0))
            if i in mobile:
                batch_stats_acc[k].update(released[i][h], y)
        released_loss.update(total_loss(loss_terms(released, y, distill)).item())
    for i in mobile:
        nets[i].load_state_dict({**nets[i].state_dict(), **saved[i]})
    record = {"test/loss": released_loss.avg}
    for _, _, k in keys:
        top = acc[k].per_sample()
        record.update({f"test/{k}/loss": ce[k].avg, f"test/{k}/top1": top[1], f"test/{k}/top5": top[5]})
    for k, meter in batch_stats_acc.items():
        top = meter.per_sample()
        name = k.replace("net2", "net2_batchstats", 1)
        record.update({f"test/{name}/top1": top[1], f"test/{name}/top5": top[5]})
    return record


def write_released_log(path, args, archs, record, num_classes, n_parameters):
    """Append the authors' `json_stats: {...}` line (options, then their keys; net 2's keys as in wrn_mobi)."""
    options = {k: getattr(args, k if k != "dataroot" else "data_root", None) for k in RELEASED_OPTIONS}
    options["save"], options["resume"] = args.run_dir, ""
    stats = {"train_loss": record["train/loss_per_batch"], "train_acc": record["train/net1/top1"],
             "test_loss": record["test/loss"], "test_acc": record["test/net1/top1"]}
    if "test/net1/aux1/top1" in record:
        stats.update({"train_acc_ep1": record["train/net1/aux1/top1"], "train_acc_ep2": record["train/net1/aux2/top1"],
                      "test_acc_ep1": record["test/net1/aux1/top1"], "test_acc_ep2": record["test/net1/aux2/top1"]})
    if len(archs) > 1:
        net2_key = "net2_batchstats" if archs[1] == "mobilenet" else "net2"
        stats.update({"train_acc_another": record["train/net2/top1"],
                      "test_acc_another": record[f"test/{net2_key}/top1"]})
    stats.update({"epoch": record["epoch"], "num_classes": num_classes, "n_parameters": n_parameters,
                  "train_time": record["train_time"], "test_time": record["test_time"]})
    with open(path, "a") as f:
        f.write("json_stats: " + json.dumps({**options, **stats}) + "\n")


if __name__ == "__main__":
    main()
