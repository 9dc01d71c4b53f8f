"""DCM's cases for `python -m common.bench`: the published pairs, each with the three columns of table 1.

    python -m common.bench --paper dcm [--device cpu] [--batch 8] [--fast]

A case builds the networks, the optimizer and the step with the training script's own functions
(`dcm.main.build_networks`, `make_optimizer` over `trainable_parameters`, `train_step`), so the measured step is the
trained one: forward of net 1 then net 2 (every head), the method's loss (DCM 6 CE + 18 KL, DML 2 + 2, baseline CE
only), one backward, one SGD step over both networks. The deployed network is net 1's main path (WRN-28-10 without
its aux heads).
"""
import functools

from common.bench import BenchCase, Built
from common.fast import prepare_model
from dcm.main import build_networks, cifar_loaders, make_optimizer, parse_args, train_step, trainable_parameters
from dcm.resnet import WRN

NUM_CLASSES = 100  # CIFAR-100, as in table 1
DEPTH, WIDTH = 28, 10


def build(device, bench_args, method, net2):
    args = parse_args(["--depth", str(DEPTH), "--width", str(WIDTH), "--method", method, "--net2", net2,
                       "--device", str(device)])
    for name in ("amp", "channels_last", "compile"):  # the fast options as common.bench resolved them
        setattr(args, name, getattr(bench_args, name))
    nets = [net.to(device) for net in build_networks(args, NUM_CLASSES)]
    models = [prepare_model(net, args) for net in nets]
    optimizer = make_optimizer(trainable_parameters(nets), args.lr, args.weight_decay)
    distill = method != "baseline"

    def step(x, y):
        train_step(models, optimizer, x, y, distill, args, device)

    # Deployed: the WRN without aux heads, holding net 1's main-path weights.
    deployed = WRN(DEPTH, WIDTH, NUM_CLASSES, aux=False).to(device)
    deployed.load_state_dict({k: v for k, v in nets[0].state_dict().items() if k in deployed.state_dict()})
    return Built(step=step, deployed=prepare_model(deployed, args), models=nets, input_size=32,
                 num_classes=NUM_CLASSES)


def train_loader(data_root, device, bench_args):
    """main.py's own train loader (released: reflect pad, flip, crop, 4 workers; or the device-resident one)."""
    flags = ["--dataroot", data_root, "--batch_size", str(bench_args.batch), "--device", str(device)]
    if bench_args.workers is not None:
        flags += ["--nthread", str(bench_args.workers)]
    args = parse_args(flags)
    for name in ("data_on_device", "channels_last"):
        setattr(args, name, getattr(bench_args, name))
    return cifar_loaders(args, device)[0]


def _arch(net2):
    name = f"wrn-{DEPTH}-{WIDTH}"
    return name if net2 == "none" else f"{name}|{name if net2 == 'wrn' else 'mobilenet'}"


CASES = [BenchCase("dcm", method, _arch(net2), functools.partial(build, method=method, net2=net2), train_loader)
         for method, net2 in (("dcm", "wrn"), ("dml", "wrn"), ("baseline", "none"),
                              ("dcm", "mobilenet"), ("dml", "mobilenet"), ("baseline", "mobilenet"))]
