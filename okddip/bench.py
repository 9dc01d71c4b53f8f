"""OKDDip's cases for `python -m common.bench`: every method of the paper's tables on every published architecture.

    python -m common.bench --paper okddip [--device cpu] [--batch 8] [--steps 2] [--warmup 1] [--fast]

A case builds the training script's own `Method` (its `get_args_parser()` defaults and `build()`) and the
`RecipeRun` that trains it, so the measured iteration is the trained one: the forward of every student (and the
frozen teacher for KD), every loss term at full ramp weight, one backward, one Nesterov SGD step, and the metrics the
loop sums. CIFAR-100 at 32 px; ResNet-34 on ImageNet (224 px, 1000 classes) for the methods of the ImageNet table.
The deployed network is the plain architecture (OKDDip's leader, a ONE/CL-ILR branch, one DML network).
"""
import functools

from common.bench import BenchCase, Built
from common.options import detached_setup
from okddip import train, train_DML, train_GL, train_kd, train_one
from okddip.engine import RecipeRun, datasets, loaders
from okddip.models import plain_network

FULL_RAMP_EPOCH = 100  # w(e) = 1: every distillation term is computed as in most of training
CIFAR_ARCHS = ("resnet32", "resnet110", "vgg16", "densenetd40k12", "wide_resnet20_8")
# method -> (script, extra flags)
METHODS = {"baseline": (train, []), "kd": (train_kd, ["--T_model", "resnet110"]), "dml": (train_DML, []),
           "one": (train_one, []), "cl-ilr": (train_one, ["--avg", "--bpscale"]), "ind": (train_one, ["--ind"]),
           "okddip": (train_GL, []), "okddip-network": (train_GL, ["--MulStu"]),
           "okddip-ensemble": (train_GL, ["--ensemble"])}
IMAGENET_METHODS = ("baseline", "dml", "one", "cl-ilr", "okddip", "okddip-network")


def script_args(method, dataset, *flags):
    script, method_flags = METHODS[method]
    return script, script.get_args_parser().parse_args(["--dataset", dataset, *method_flags, *flags])


def build(fast, batch, method, arch):
    dataset = "imagenet" if arch == "resnet34" else "CIFAR100"
    num_classes = 1000 if dataset == "imagenet" else 100
    script, args = script_args(method, dataset, "--model", arch)
    if method == "kd":  # a freshly initialised teacher: the same work as a trained one
        trained = script.build(args, num_classes, fast.prepare(plain_network(args.T_model, num_classes)
                                                               .to(fast.device).eval()))
    else:
        trained = script.build(args, num_classes)
    run = RecipeRun(detached_setup(fast), args, trained)
    run.on_epoch_start(FULL_RAMP_EPOCH)
    deployed = plain_network(arch, num_classes).to(fast.device)
    return Built(step=lambda x, y: run.train_step(0, x, y), deployed=fast.prepare(deployed), models=[run.model],
                 input_size=224 if dataset == "imagenet" else 32, num_classes=num_classes)


def train_loader(data_root, fast, batch, workers, method, dataset):
    """The script's own train loader (engine.loaders: the released PIL pipeline with its default workers, or the
    device-resident one when the Fast value holds the data on the device)."""
    flags = ["--data-root", data_root, "--batch_size", str(batch)]
    if workers is not None:
        flags += ["--num_workers", str(workers)]
    _, args = script_args(method, dataset, *flags)
    train_set, test_set, _ = datasets(args)
    return loaders(args, train_set, test_set, detached_setup(fast))[0]


def case(method, arch):
    dataset = "imagenet" if arch == "resnet34" else "CIFAR100"
    return BenchCase("okddip", method, arch, functools.partial(build, method=method, arch=arch),
                     functools.partial(train_loader, method=method, dataset=dataset), dataset.lower())


CASES = [case(method, arch) for arch in CIFAR_ARCHS for method in METHODS] + \
        [case(method, "resnet34") for method in IMAGENET_METHODS]
