"""DCM (Dense Cross-layer Mutual-distillation, Yao & Sun, ECCV 2020) on CIFAR, with the DML and baseline columns.

    cd dcm && python main.py --depth 28 --width 10                     # WRN-28-10 | WRN-28-10, DCM (wrn/main.py)
    cd dcm && python main.py --net2 mobilenet                          # WRN-28-10 | MobileNet, DCM (wrn_mobi/main.py)
    python -m dcm.main --method dml ...                                # two networks, final heads, CE + mutual KL
    python -m dcm.main --method baseline --net2 none ...               # one network trained alone

Every option of the authors' main.py keeps its name, default and meaning; see dcm/README.md. Faithful to the
released code: one SGD over both networks, rebuilt (momentum reset) at each learning-rate drop, the 24-term loss,
reflect padding, CIFAR-10 normalisation constants. Unlike it, every head of both networks is evaluated each epoch,
both networks are checkpointed, and --resume works.

The fast path (common.fast; all off by default; `--fast` turns it all on on a GPU, channels_last alone on the CPU):
--data-on-device keeps CIFAR on the device and augments there with the released reflect padding and pad -> flip ->
crop order; --amp bf16 runs the forwards under autocast while every softmax, CE and KL stays in fp32;
--channels-last and --compile prepare the networks. Inside the training step nothing waits for the device: losses and
accuracies are summed on it and read at the print interval (--print_freq) and at the epoch end.
"""
import argparse
import json
import os

import torch
import torch.nn as nn

from common.checkpoint import CHECKPOINT_NAME, ResumableEpoch, load_checkpoint, save_checkpoint
from common.data import cifar_datasets, cifar_test_transform, cifar_train_transform, make_loader
from common.fast import DeviceCifarLoader, add_fast_args, autocast, prepare_model, resolve_fast_args
from common.logging import FiniteGuard, RunLogger, add_common_args
from common.meters import AccuracyMeter, Timer
from dcm.losses import cross_entropy, loss_terms, term_names, total_loss
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
    parser.add_argument("--print_freq", default=20, type=int,
                        help="iterations between reads of the running loss (progress bar, NaN check)")
    add_common_args(parser, data_root_default="./data", data_root_flags=("--data-root", "--dataroot"))
    add_fast_args(parser)
    args = parser.parse_args(argv)
    resolve_fast_args(args)

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
    if args.compile and args.ngpu > 1:
        parser.error("--compile (or --fast) with --ngpu > 1: nn.DataParallel cannot replicate a compiled network")
    for name in ("batch_size", "epochs", "nthread", "ngpu", "print_freq"):
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


def restore_batch_norm_buffers(net, saved):
    state = net.state_dict()
    with torch.no_grad():
        for k, v in saved.items():
            state[k].copy_(v)


def forward_all(models, x):
    return [list(model(x)) for model in models]


def trainable_parameters(nets):
    """What the released optimizer sees: every trainable tensor of net 1, then net 2's."""
    return [p for net in nets for p in net.parameters()]


def make_optimizer(params, lr, weight_decay):
    """The released optimizer: one SGD over both networks (net 1's tensors first), no Nesterov."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def optimizer_for_epoch(optimizer, params, epoch, args):
    """The released schedule at the start of 0-based EPOCH: when the 1-based epoch is in --epoch_step, a brand-new
    SGD with the lr times --lr_decay_ratio (the momentum buffers are dropped, as released); otherwise OPTIMIZER."""
    if epoch + 1 not in args.epoch_step:
        return optimizer
    return make_optimizer(params, optimizer.param_groups[0]["lr"] * args.lr_decay_ratio, args.weight_decay)


def train_step(models, optimizer, x, y, distill, args, device):
    """One released iteration: zero_grad, forward net 1 then net 2 on the same batch, the loss, backward, SGD step.

    Under --amp bf16 only the forwards run in autocast: loss_terms takes every logit in at least fp32, so the
    softmaxes, CEs and KLs are fp32. Returns the pre-update outputs, the loss terms and the total, all still on the
    device.
    """
    optimizer.zero_grad()
    with autocast(args, device):
        outputs = forward_all(models, x)
    terms = loss_terms(outputs, y, distill)
    loss = total_loss(terms)
    loss.backward()
    optimizer.step()
    return outputs, terms, loss


def to_device(x, y, device, channels_last):
    x, y = x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True).long()
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def cifar_loaders(args, device):
    """Train and test loaders: the released torchvision pipeline, or the same augmentation on the device.

    Released semantics either way: reflect padding, pad -> flip -> crop, CIFAR-10 normalisation, batch
    --batch_size for train and test, train shuffled, test in order, no drop_last.
    """
    train_set, test_set = cifar_datasets(args.dataset, args.data_root,
                                         cifar_train_transform(MEAN, STD, "reflect", "pad_flip_crop"),
                                         cifar_test_transform(MEAN, STD), download=True, flag="--dataroot")
    if args.data_on_device:
        common = dict(device=device, mean=MEAN, std=STD, padding_mode="reflect", order="pad_flip_crop",
                      drop_last=False, seed=args.seed, channels_last=args.channels_last)
        return (DeviceCifarLoader(train_set, args.batch_size, train=True, shuffle=True, **common),
                DeviceCifarLoader(test_set, args.batch_size, train=False, shuffle=False, **common))
    pin = device.type == "cuda"
    return (make_loader(train_set, args.batch_size, shuffle=True, workers=args.nthread, pin_memory=pin),
            make_loader(test_set, args.batch_size, shuffle=False, workers=args.nthread, pin_memory=pin))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(args.gpu_id.split(",")[0]))
    torch.backends.cudnn.benchmark = True  # as released
    num_classes = 10 if args.dataset.upper().replace("-", "") == "CIFAR10" else 100

    torch.manual_seed(args.seed)
    train_loader, test_loader = cifar_loaders(args, device)

    # `nets` are the plain modules (their state_dicts go into checkpoints); `models` are what gets called: the same
    # modules in channels_last, compiled, or data-parallel as requested.
    nets = [net.to(device) for net in build_networks(args, num_classes)]
    archs = ["wrn"] + ([args.net2] if len(nets) > 1 else [])
    models = [prepare_model(net, args) for net in nets]
    if args.ngpu > 1:
        ids = [int(i) for i in args.gpu_id.split(",")] if "," in args.gpu_id else list(range(args.ngpu))
        models = [nn.DataParallel(model, device_ids=ids[: args.ngpu]) for model in models]
    params = trainable_parameters(nets)
    n_parameters = sum(p.numel() for p in params)
    distill = args.method != "baseline"
    on_device_data = isinstance(train_loader, DeviceCifarLoader)  # draws from its own generator, checkpointed

    optimizer = make_optimizer(params, args.lr, args.weight_decay)
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
        optimizer = make_optimizer(params, ckpt["optimizer"]["param_groups"][0]["lr"], args.weight_decay)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, epoch_resume, best = ckpt["epoch"], ckpt.get("epoch_state"), ckpt.get("best", {})
        loader_state = (epoch_resume or ckpt).get("train_loader")
        if on_device_data and loader_state is not None:
            train_loader.load_state_dict({"generator": loader_state["generator"].cpu()})
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
        state = {"nets": [net.state_dict() for net in nets], "optimizer": optimizer.state_dict(), "epoch": epoch,
                 "epoch_state": epoch_state, "best": best}
        if on_device_data:  # where the device loader's generator stands at this epoch end
            state["train_loader"] = train_loader.state_dict()
        save_checkpoint(ckpt_path, state, meta=meta)

    guard = FiniteGuard()
    names, record = None, None
    for epoch in range(start_epoch, args.epochs):
        if epoch_resume is None:  # a mid-epoch resume restored the optimizer of this epoch
            optimizer = optimizer_for_epoch(optimizer, params, epoch, args)
        for model in models:
            model.train()
        timer = Timer()
        # Running sums kept on the device (read at the print interval and the epoch end). In float64, so that they
        # equal a Python-float accumulation of loss.item(): [sum of batch losses (the released unweighted
        # per-batch meter), sum of batch size x batch loss (per-sample mean)].
        loss_sums, batches_seen, samples_seen = torch.zeros(2, dtype=torch.float64, device=device), 0, 0
        term_sums = None
        train_acc = {k: AccuracyMeter() for _, _, k in keys}
        loader_state = train_loader.state_dict() if on_device_data else None  # for a mid-epoch checkpoint
        batches = ResumableEpoch(train_loader, resume=epoch_resume)
        if epoch_resume:  # the epoch's running meters continue where the checkpoint left them
            m = epoch_resume["meters"]
            loss_sums, batches_seen, samples_seen = m["loss_sums"].to(device), m["batches"], m["samples"]
            term_sums = m["term_sums"].to(device) if m["term_sums"] is not None else None
            for k, state in m["acc"].items():
                vars(train_acc[k]).update({n: (v.to(device) if torch.is_tensor(v) else v) for n, v in state.items()})
        epoch_resume = None
        total = min(len(train_loader), args.steps_per_epoch or len(train_loader))
        progress = logger.progress(batches, desc=f"epoch {epoch + 1}/{args.epochs}", total=total)
        for step, (x, y) in progress:
            if args.steps_per_epoch and step >= args.steps_per_epoch:
                break
            x, y = to_device(x, y, device, args.channels_last)
            n = x.size(0)
            outputs, terms, loss = train_step(models, optimizer, x, y, distill, args, device)
            guard.update(loss)
            names = names or term_names(outputs, distill)
            detached = torch.stack([t.detach() for t in terms])
            term_sums = detached * n if term_sums is None else term_sums + detached * n
            batch_loss = loss.detach().double()
            loss_sums += torch.stack([batch_loss, batch_loss * n])
            batches_seen, samples_seen = batches_seen + 1, samples_seen + n
            for i, h, k in keys:
                train_acc[k].update(outputs[i][h], y)  # pre-update outputs, as released
            if (step + 1) % args.print_freq == 0:  # the only host syncs of the loop
                guard.check(f"epoch {epoch + 1}, step {step + 1}", ckpt_path if os.path.exists(ckpt_path) else None)
                if hasattr(progress, "set_postfix"):
                    progress.set_postfix(loss=f"{loss.item():.3f}")
            if args.save_every_steps and (step + 1) % args.save_every_steps == 0:
                save(epoch, dict(batches.state(step + 1), train_loader=loader_state, meters={
                    "loss_sums": loss_sums, "batches": batches_seen, "samples": samples_seen,
                    "term_sums": term_sums, "acc": {k: dict(vars(a)) for k, a in train_acc.items()}}))
        guard.check(f"epoch {epoch + 1}", ckpt_path if os.path.exists(ckpt_path) else None)
        train_time = timer.elapsed()

        test = evaluate(models, nets, archs, test_loader, device, args, distill)
        test_time = timer.elapsed() - train_time
        loss_batch_sum, loss_sample_sum = loss_sums.tolist()
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "epoch_time": train_time + test_time,
                  "images_per_s": samples_seen / max(train_time, 1e-9), "train_time": train_time,
                  "test_time": test_time, "train/loss": loss_sample_sum / samples_seen,
                  "train/loss_per_batch": loss_batch_sum / batches_seen}
        record.update({f"train/{term_key(n)}": v / samples_seen for n, v in zip(names, term_sums.tolist())})
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


def test_outputs(models, nets, archs, x):
    """One test batch: the outputs of every network with eval-mode BN, and those of the released test path, where
    MobileNet keeps train-mode BN (batch statistics). That pass would write the test batch into MobileNet's running
    statistics (the released code let it, and never used them); they are put back at once, so that the eval-mode
    pass of every batch reads the trained statistics."""
    for model in models:
        model.eval()
    outputs = forward_all(models, x)
    released = list(outputs)
    for i, arch in enumerate(archs):
        if arch == "mobilenet":
            saved = batch_norm_buffers(nets[i])
            models[i].train()
            released[i] = list(models[i](x))
            models[i].eval()
            restore_batch_norm_buffers(nets[i], saved)
    return outputs, released


@torch.no_grad()
def evaluate(models, nets, archs, loader, device, args, distill):
    """Every head of every network, eval-mode BN; MobileNet also with batch-statistics BN (the released test path).

    The released test loss is the method's loss with the WRNs in eval mode and MobileNet in train mode; its
    per-batch unweighted mean is logged as test/loss. Losses are summed on the device in float64 (equal to summing
    their .item()s) and read once at the end.
    """
    keys = head_keys(nets)
    acc = {k: AccuracyMeter() for _, _, k in keys}
    mobile = [i for i, a in enumerate(archs) if a == "mobilenet"]
    batch_stats_acc = {k: AccuracyMeter() for i, _, k in keys if i in mobile}
    ce_sums = torch.zeros(len(keys), dtype=torch.float64, device=device)  # sum of batch size x head CE
    released_loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum of batch losses
    batches, samples = 0, 0
    for b, (x, y) in enumerate(loader):
        if args.eval_batches and b >= args.eval_batches:
            break
        x, y = to_device(x, y, device, args.channels_last)
        with autocast(args, device):
            outputs, released = test_outputs(models, nets, archs, x)
        ce = torch.stack([cross_entropy(outputs[i][h], y) for i, h, _ in keys])
        ce_sums += ce.double() * x.size(0)
        for i, h, k in keys:
            acc[k].update(outputs[i][h], y)
            if i in mobile:
                batch_stats_acc[k].update(released[i][h], y)
        released_loss_sum += total_loss(loss_terms(released, y, distill)).double()
        batches, samples = batches + 1, samples + x.size(0)
    record = {"test/loss": released_loss_sum.item() / max(batches, 1)}
    for (_, _, k), ce_sum in zip(keys, ce_sums.tolist()):
        top = acc[k].per_sample()
        record.update({f"test/{k}/loss": ce_sum / max(samples, 1), f"test/{k}/top1": top[1],
                       f"test/{k}/top5": top[5]})
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
