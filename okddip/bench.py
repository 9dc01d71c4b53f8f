"""OKDDip's cases for `python -m common.bench`: every method of the paper's tables on every published architecture.

    python -m common.bench --paper okddip [--device cpu] [--batch 8] [--steps 2] [--warmup 1] [--fast]

A case builds the model and the step with the training script's own `parser()` and `build()`, and the engine's
`make_optimizer` and `optimize`, so the measured iteration is the trained one: the forward of every student (and the
frozen teacher for KD), every loss term at full ramp weight, one backward, one Nesterov SGD step. CIFAR-100 at 32 px;
ResNet-34 on ImageNet (224 px, 1000 classes) for OKDDip and the baseline. The deployed network is the plain
architecture (OKDDip's leader, a ONE/CL-ILR branch, one DML network).
"""
import functools

from common.bench import BenchCase, Built
from common.fast import prepare_model
from okddip import train, train_DML, train_GL, train_kd, train_one
from common.distributed import init_distributed
from okddip.engine import data, make_optimizer, optimize
from okddip.models import plain_network

FULL_RAMP_EPOCH = 100  # w(e) = 1: every distillation term is computed as in most of training
CIFAR_ARCHS = ("resnet32", "resnet110", "vgg16", "densenetd40k12", "wide_resnet20_8")
# method -> (script, extra flags)
METHODS = {"baseline": (train, []), "kd": (train_kd, ["--T_model", "resnet110"]), "dml": (train_DML, []),
           "one": (train_one, []), "cl-ilr": (train_one, ["--avg", "--bpscale"]), "ind": (train_one, ["--ind"]),
           "okddip": (train_GL, []), "okddip-network": (train_GL, ["--MulStu"])}


def build(device, bench_args, method, arch):
    script, flags = METHODS[method]
    dataset = "imagenet" if arch == "resnet34" else "CIFAR100"
    num_classes = 1000 if dataset == "imagenet" else 100
    args = script.parser().parse_args(["--model", arch, "--dataset", dataset, "--device", str(device)] + flags)
    for name in ("amp", "channels_last", "compile"):  # the fast options as common.bench resolved them
        setattr(args, name, getattr(bench_args, name))
    if method == "kd":  # a freshly initialised teacher: the same work as a trained one
        teacher = plain_network(args.T_model, num_classes).to(device).eval()
        model, step = script.build(args, num_classes, prepare_model(teacher, args))
    else:
        model, step = script.build(args, num_classes)[:2]
    model = model.to(device)
    net = prepare_model(model, args)
    optimizer = make_optimizer(model, args)

    def train_step(x, y):
        optimize(net, optimizer, step, x, y, FULL_RAMP_EPOCH)

    deployed = plain_network(arch, num_classes).to(device)
    return Built(step=train_step, deployed=prepare_model(deployed, args), models=[model],
                 input_size=224 if dataset == "imagenet" else 32, num_classes=num_classes)


def train_loader(data_root, device, bench_args, method, dataset):
    """The scripts' own train loader (engine.data: the released PIL pipeline with 8 workers, or the device one)."""
    script, flags = METHODS[method]
    flags = ["--dataset", dataset, "--data-root", data_root, "--batch_size", str(bench_args.batch)] + flags
    if bench_args.workers is not None:
        flags += ["--num_workers", str(bench_args.workers)]
    args = script.parser().parse_args(flags)
    for name in ("data_on_device", "channels_last"):
        setattr(args, name, getattr(bench_args, name))
    return data(args, init_distributed(device))[0]


def case(method, arch):
    dataset = "imagenet" if arch == "resnet34" else "CIFAR100"
    return BenchCase("okddip", method, arch, functools.partial(build, method=method, arch=arch),
                     functools.partial(train_loader, method=method, dataset=dataset), dataset.lower())


CASES = [case(method, arch) for arch in CIFAR_ARCHS for method in METHODS] + \
        [case(method, "resnet34") for method in ("baseline", "okddip")]
