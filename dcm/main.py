"""DCM (Dense Cross-layer Mutual-distillation, Yao & Sun, ECCV 2020) on CIFAR, with the DML and baseline columns.

    cd dcm && python main.py --depth 28 --width 10                     # WRN-28-10 | WRN-28-10, DCM (wrn/main.py)
    cd dcm && python main.py --net2 mobilenet                          # WRN-28-10 | MobileNet, DCM (wrn_mobi/main.py)
    python -m dcm.main --method dml ...                                # two networks, final heads, CE + mutual KL
    python -m dcm.main --method baseline --net2 none ...               # one network trained alone
    python -m dcm.main ... --resume                                    # continue the run in --run-dir (--save)

Every option of the authors' main.py keeps its name, default and meaning; see dcm/README.md. Faithful to the
released code: one SGD over both networks, rebuilt (momentum reset) at each learning-rate drop, the 24-term loss,
reflect padding, CIFAR-10 normalisation constants. Unlike it, every head of both networks is evaluated each epoch,
both networks are checkpointed, and --resume works (common.loop.fit drives the epochs; DCMRun is the paper's part).

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

from common.cli import run_main
from common.data import cifar_datasets, cifar_test_transform, cifar_train_transform, make_loader
from common.fast import DeviceCifarLoader, add_fast_args
from common.loop import Run, evaluate, fit
from common.meters import Timer, topk_accuracy
from common.options import add_run_args, check_positive, loader_workers, setup_run
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
RELEASED_LOG_PREFIX = "json_stats: "


def epoch_list(text):
    """--epoch_step: a JSON list of integers."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in value):
        raise argparse.ArgumentTypeError(f"must be a JSON list of integers like '[60,120,160]'; got {text!r}")
    return value


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The authors' options (wrn/main.py and wrn_mobi/main.py have the same list and defaults).
    parser.add_argument("--model", default="resnet", type=str, help="only logged, as released")
    parser.add_argument("--depth", default=28, type=int, help="WRN depth (net 1, and net 2 when it is a WRN)")
    parser.add_argument("--width", default=10, type=float, help="WRN widening factor (channels int(16w, 32w, 64w))")
    parser.add_argument("--dataset", default="CIFAR100", type=str, help="CIFAR10 or CIFAR100")
    parser.add_argument("--dtype", default="float", type=str, help="input dtype; only 'float' works, as released")
    parser.add_argument("--groups", default=1, type=int, help="only logged, as released")
    parser.add_argument("--nthread", default=loader_workers(4), type=int,
                        help="DataLoader workers, train and test (the released 4, at most this machine's cores)")
    parser.add_argument("--seed", default=1, type=int, help="torch.manual_seed, before the networks are built")
    parser.add_argument("--batch_size", default=128, type=int, help="train and test batch size")
    parser.add_argument("--lr", default=0.1, type=float, help="initial learning rate")
    parser.add_argument("--epochs", default=200, type=int)
    parser.add_argument("--weight_decay", default=0.0005, type=float, help="SGD weight decay on every parameter")
    parser.add_argument("--epoch_step", default="[60,120,160]", type=epoch_list,
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
    add_run_args(parser, data_root_aliases=("--dataroot",))
    add_fast_args(parser)
    return parser


def check_args(parser, args):
    """Every value the script cannot honour is a parser error (nothing is written into ARGS)."""
    check_positive(parser, args, ["batch_size", "epochs", "lr", "lr_decay_ratio", "ngpu", "print_freq", "nthread",
                                  "weight_decay"], allow_zero=("nthread", "weight_decay"))
    try:
        wrn_hyper(args.depth, args.width)
    except ValueError as e:
        parser.error(str(e))
    if args.dtype != "float":
        parser.error(f"--dtype {args.dtype!r}: the parameters are float32, so only --dtype float can run "
                     f"(the released code broke with any other value)")
    if args.method != "baseline" and args.net2 == "none":
        parser.error(f"--method {args.method} distils between two networks; --net2 none is for --method baseline")
    if args.dataset.upper().replace("-", "") not in ("CIFAR10", "CIFAR100"):
        parser.error(f"--dataset {args.dataset!r}: valid values are CIFAR10, CIFAR100")
    try:
        gpu_ids = [int(i) for i in args.gpu_id.split(",")]
    except ValueError:
        parser.error(f"--gpu_id must be GPU numbers separated by commas, like 0 or 0,1; got {args.gpu_id!r}")
    if args.ngpu > 1:
        if not args.device.startswith("cuda"):
            parser.error(f"--ngpu {args.ngpu} splits each batch over GPUs; it needs --device cuda")
        if 1 < len(gpu_ids) < args.ngpu:
            parser.error(f"--ngpu {args.ngpu} with --gpu_id {args.gpu_id}: name at least {args.ngpu} GPUs")
        if args.compile or args.fast:
            parser.error("--compile (or --fast) with --ngpu > 1: nn.DataParallel cannot replicate a compiled network")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("dcm/main.py trains in one process (--ngpu splits a batch over GPUs): launch it with python, "
                     "not torchrun")


def class_count(args):
    return 10 if args.dataset.upper().replace("-", "") == "CIFAR10" else 100


def default_run_dir(args):
    return args.save or os.path.join("logs", f"wrn-{args.depth}-{args.width:g}_{args.net2}_{args.method}_"
                                             f"seed{args.seed}")


def device_name(args):
    """--device; a bare `cuda` gets --gpu_id's first id as its index (the released script chose the GPU by it)."""
    return f"cuda:{args.gpu_id.split(',')[0]}" if args.device == "cuda" else args.device


def data_parallel_ids(args):
    ids = [int(i) for i in args.gpu_id.split(",")]
    return (ids if len(ids) > 1 else list(range(args.ngpu)))[: args.ngpu]


def cifar_sets(args):
    """The released datasets: reflect padding, pad -> flip -> crop, CIFAR-10 normalisation; downloaded into
    --dataroot when missing, as released."""
    return cifar_datasets(args.dataset, args.data_root, cifar_train_transform(MEAN, STD, "reflect", "pad_flip_crop"),
                          cifar_test_transform(MEAN, STD), download=True, flag="--dataroot")


def cifar_loaders(args, train_set, test_set, fast):
    """Train and test loaders: the released torchvision pipeline, or the same augmentation on the device
    (--data-on-device, drawing from its own generator seeded with --seed). Released semantics either way: batch
    --batch_size for train and test, train shuffled, test in order, no drop_last."""
    if fast.data_on_device:
        shared = dict(device=fast.device, mean=MEAN, std=STD, padding_mode="reflect", order="pad_flip_crop",
                      drop_last=False, seed=args.seed)
        return (DeviceCifarLoader(train_set, args.batch_size, train=True, shuffle=True, **shared),
                DeviceCifarLoader(test_set, args.batch_size, train=False, shuffle=False, **shared))
    pin = fast.device.type == "cuda"
    return (make_loader(train_set, args.batch_size, shuffle=True, workers=args.nthread, pin_memory=pin),
            make_loader(test_set, args.batch_size, shuffle=False, workers=args.nthread, pin_memory=pin))


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


def batch_stats_key(key):
    """'net2/aux1' -> 'net2_batchstats/aux1': MobileNet's heads on the released batch-statistics test pass."""
    return key.replace("net2", "net2_batchstats", 1)


class DCMRun(Run):
    """The released training of one pair (or, for the baseline, of networks that never interact): NETS are the plain
    modules on the setup's device (build_networks); what gets called is the same modules in channels_last, compiled
    or data-parallel as requested. One SGD over every tensor of both networks, rebuilt at each lr drop."""

    def __init__(self, setup, args, nets, test_loader=None):
        self.setup, self.args, self.test_loader = setup, args, test_loader
        self.nets = nets
        self.archs = ["wrn"] + ([args.net2] if len(nets) > 1 else [])
        self.models = [setup.fast.prepare(net) for net in nets]
        if args.ngpu > 1:
            self.models = [nn.DataParallel(model, device_ids=data_parallel_ids(args)) for model in self.models]
        self.params = trainable_parameters(nets)
        self.distill = args.method != "baseline"
        self.heads = head_keys(nets)
        self.optimizer = make_optimizer(self.params, args.lr, args.weight_decay)
        self.best = {}
        self.log_txt = os.path.join(setup.run_dir, "log.txt")

    def describe(self):
        sizes = [sum(p.numel() for p in net.parameters()) for net in self.nets]
        return (f"==> networks: {' | '.join(self.archs)}, method {self.args.method}, parameters: "
                + ", ".join(f"{net_label(i)} {n:,}" for i, n in enumerate(sizes)) + f" (total {sum(sizes):,})")

    def on_epoch_start(self, epoch):
        self.optimizer = optimizer_for_epoch(self.optimizer, self.params, epoch, self.args)
        for model in self.models:
            model.train()

    def iteration(self, x, y):
        """One released iteration: zero_grad, forward net 1 then net 2 on the same batch, the loss, backward, SGD step.

        Under --amp bf16 only the forwards run in autocast: loss_terms takes every logit in at least fp32, so the
        softmaxes, CEs and KLs are fp32. Returns the pre-update outputs, the loss terms and the total, all still on the
        device.
        """
        self.optimizer.zero_grad()
        with self.setup.fast.autocast():
            outputs = forward_all(self.models, x)
        terms = loss_terms(outputs, y, self.distill)
        loss = total_loss(terms)
        loss.backward()
        self.optimizer.step()
        return outputs, terms, loss

    def train_step(self, step, x, y):
        outputs, terms, loss = self.iteration(x, y)
        values = {"loss": loss.detach()}
        values.update({term_key(name): t.detach() for name, t in zip(term_names(outputs, self.distill), terms)})
        for i, h, key in self.heads:  # the pre-update outputs' accuracy, as released
            values.update(topk_accuracy(outputs[i][h], y, (1,), f"{key}/"))
        return values

    def train_record(self, meter):
        """Per-sample means, and the released meter's unweighted mean over batches as train/loss_per_batch."""
        return {"lr": self.optimizer.param_groups[0]["lr"], **meter.per_sample("train/"),
                "train/loss_per_batch": meter.per_batch()["loss"]}

    def evaluate(self, epoch):
        """Every head of every network with eval-mode BN; MobileNet also with batch-statistics BN (the released test
        path). test/loss is the released test loss: the method's loss with the WRNs in eval mode and MobileNet in
        train mode, as an unweighted mean over batches; everything else is a per-sample mean."""
        timer = Timer()

        def forward(x, y):
            with self.setup.fast.autocast():
                outputs, released = test_outputs(self.models, self.nets, self.archs, x)
            values = {"loss": total_loss(loss_terms(released, y, self.distill))}
            for i, h, key in self.heads:
                values[f"{key}/loss"] = cross_entropy(outputs[i][h], y)
                values.update(topk_accuracy(outputs[i][h], y, (1, 5), f"{key}/"))
                if self.archs[i] == "mobilenet":
                    values.update(topk_accuracy(released[i][h], y, (1, 5), f"{batch_stats_key(key)}/"))
            return values

        meter = evaluate(forward, self.test_loader, self.setup)
        record = meter.per_sample("test/")
        record["test/loss"] = meter.per_batch("test/")["test/loss"]
        record["test_time"] = timer.elapsed()
        return record

    def on_epoch_end(self, epoch, record):
        for key in [k for k in record if k.startswith("test/") and k.endswith("/top1")]:
            self.best[key] = max(self.best.get(key, 0.0), record[key])
            record["best/" + key[len("test/"):]] = self.best[key]
        if self.setup.ctx.is_main:
            write_released_log(self.log_txt, self.args, self.setup.run_dir, self.archs, record,
                               self.nets[0].num_classes, sum(p.numel() for p in self.params))
        self.setup.logger.print(
            f"==> id: {self.setup.run_dir} ({record['epoch']}/{self.args.epochs}), test_acc: "
            f"{record['test/net1/top1']:.2f}" + (f", net2 test_acc: {record['test/net2/top1']:.2f}"
                                                 if len(self.nets) > 1 else "")
            + f", train loss {record['train/loss']:.4f}")

    def truncate_logs(self, epochs_done):
        """On resume: log.txt cut back to the checkpoint's epochs (a line torn by a kill goes too)."""
        if not os.path.exists(self.log_txt):
            return
        with open(self.log_txt) as f:
            epochs = [(line, released_log_epoch(line)) for line in f]
        with open(self.log_txt, "w") as f:
            f.writelines(line for line, epoch in epochs if epoch is not None and epoch <= epochs_done)

    def state_dict(self):
        return {"archs": list(self.archs), "nets": [net.state_dict() for net in self.nets],
                "optimizer": self.optimizer.state_dict(), "best": dict(self.best)}

    def load_state_dict(self, state):
        for net, net_state in zip(self.nets, state["nets"]):
            net.load_state_dict(net_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.best = dict(state["best"])


def write_released_log(path, args, run_dir, archs, record, num_classes, n_parameters):
    """Append the authors' `json_stats: {...}` line (options, then their keys; net 2's keys as in wrn_mobi)."""
    options = {k: getattr(args, k if k != "dataroot" else "data_root", None) for k in RELEASED_OPTIONS}
    options["save"], options["resume"] = run_dir, ""
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
        f.write(RELEASED_LOG_PREFIX + json.dumps({**options, **stats}) + "\n")


def released_log_epoch(line):
    """The epoch of one log.txt line, or None for a line a kill tore."""
    try:
        return json.loads(line[len(RELEASED_LOG_PREFIX):])["epoch"]
    except (ValueError, KeyError, TypeError):
        return None


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    # The datasets come first, so that a missing one leaves no run folder behind; they draw no random numbers, so
    # the released order (seed, datasets, networks) is kept.
    train_set, test_set = cifar_sets(args)
    setup = setup_run(parser, args, SCRIPT, default_run_dir(args), seed=args.seed, streams=("torch",),
                      cudnn_benchmark=True, may_change=("save", "gpu_id", "print_freq"), device=device_name(args))
    train_loader, test_loader = cifar_loaders(args, train_set, test_set, setup.fast)
    nets = [net.to(setup.device) for net in build_networks(args, class_count(args))]
    run = DCMRun(setup, args, nets, test_loader)
    setup.logger.print(run.describe())
    return fit(run, train_loader, setup, args.epochs, print_every=args.print_freq)


if __name__ == "__main__":
    run_main(main)
