"""DCM's cases for `python -m common.bench`: both published pairs at two sizes, each with the three columns of table 1.

    python -m common.bench --paper dcm --arch 'wrn-16-2|wrn-16-2' [--device cpu] [--batch 32] [--fast]
    python -m common.bench --paper dcm --arch 'wrn-28-10|wrn-28-10' --device cuda --batch 128      # as released

A case builds the networks with the training script's `build_networks` and trains them with its `DCMRun` (the
optimizer of `make_optimizer` over `trainable_parameters`, the first epoch's lr, the released iteration and the
metrics the loop sums), so the measured step is the trained one: forward of net 1 then net 2 (every head), the
method's loss (DCM 6 CE + 18 KL, DML 2 + 2, baseline CE only), one backward, one SGD step over both networks. The
deployed network is net 1's main path (the WRN without its aux heads).

Sizes: WRN-16-2, a pair the CPU can run, and WRN-28-10, the released one (time it at the released batch 128);
`cases(depth, width)` gives the six cases of any other WRN.
"""
import functools

from common.bench import BenchCase, Built
from common.options import detached_setup
from dcm.main import DCMRun, build_networks, cifar_loaders, cifar_sets, get_args_parser
from dcm.published import pair_arch
from dcm.resnet import WRN

NUM_CLASSES = 100  # CIFAR-100, as in table 1
SIZES = ((16, 2), (28, 10))
COLUMNS = (("dcm", "wrn"), ("dml", "wrn"), ("baseline", "none"), ("dcm", "mobilenet"), ("dml", "mobilenet"),
           ("baseline", "mobilenet"))


def script_args(depth, width, method, net2, *flags):
    return get_args_parser().parse_args(["--depth", str(depth), "--width", str(width), "--method", method,
                                         "--net2", net2, *flags])


def build(fast, batch, depth, width, method, net2):
    args = script_args(depth, width, method, net2)
    nets = [net.to(fast.device) for net in build_networks(args, NUM_CLASSES)]
    run = DCMRun(detached_setup(fast), args, nets)
    run.on_epoch_start(0)
    deployed = WRN(depth, width, NUM_CLASSES, aux=False).to(fast.device)
    deployed.load_state_dict({k: v for k, v in nets[0].state_dict().items() if k in deployed.state_dict()})
    return Built(step=lambda x, y: run.train_step(0, x, y), deployed=fast.prepare(deployed), models=nets,
                 input_size=32, num_classes=NUM_CLASSES)


def train_loader(data_root, fast, batch, workers, depth, width, method, net2):
    """main.py's own train loader (released: reflect pad, flip, crop, 4 workers; or the device-resident one)."""
    flags = ["--dataroot", data_root, "--batch_size", str(batch)] + (["--nthread", str(workers)] if workers is not
                                                                     None else [])
    args = script_args(depth, width, method, net2, *flags)
    return cifar_loaders(args, *cifar_sets(args), fast)[0]


def cases(depth, width):
    """The six cases of table 1's columns for WRN-DEPTH-WIDTH."""
    return [BenchCase("dcm", method, pair_arch(depth, width, net2),
                      functools.partial(build, depth=depth, width=width, method=method, net2=net2),
                      functools.partial(train_loader, depth=depth, width=width, method=method, net2=net2))
            for method, net2 in COLUMNS]


CASES = [case for depth, width in SIZES for case in cases(depth, width)]
