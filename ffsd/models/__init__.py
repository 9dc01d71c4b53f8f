"""Architectures by the authors' `--model` names, plus the fusion module and the self-distillation decoders."""
from functools import partial

from ffsd.models.densenet import DenseNet
from ffsd.models.fusion import FusionModule, TransFusionModule
from ffsd.models.googlenet import GoogLeNet
from ffsd.models.resnet import CifarResNet, ImageNetResNet
from ffsd.models.self_distillation import SelfDistillationModel, halving_channels
from ffsd.models.wideresnet import WideResNet

CIFAR_MODELS = {
    "resnet20": partial(CifarResNet, 20),
    "resnet32": partial(CifarResNet, 32),
    "resnet56": partial(CifarResNet, 56),
    "wideresnet1602": partial(WideResNet, 16, 2, 0.0),
    "wideresnet4002": partial(WideResNet, 40, 2, 0.0),
    "wideresnet2810": partial(WideResNet, 28, 10, 0.3),  # present in the released code, unused by its README
    "densenet": partial(DenseNet, 40, 12, 1, 0.0),
    "googlenet": GoogLeNet,
}
IMAGENET_MODELS = {
    "resnet18": partial(ImageNetResNet, [2, 2, 2, 2]),
    "resnet34": partial(ImageNetResNet, [3, 4, 6, 3]),
}
MODELS = {"cifar100": CIFAR_MODELS, "imagenet": IMAGENET_MODELS}
NUM_CLASSES = {"cifar100": 100, "imagenet": 1000}
# DenseNet and GoogLeNet decoders rebuild exactly the backbone's hooked widths; the others halve the channels.
DECODER_CHANNELS = {"densenet": [456, 312, 168], "googlenet": [1024, 832, 480]}


def check_model_name(model, dataset="cifar100"):
    if dataset not in MODELS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(MODELS)}")
    if model not in MODELS[dataset]:
        other = [d for d in MODELS if model in MODELS[d]]
        hint = f" ({model} is a {other[0]} model)" if other else ""
        raise ValueError(f"unknown --model {model!r} for --dataset {dataset}{hint}; valid: "
                         f"{', '.join(MODELS[dataset])}")


def create_model(model, dataset="cifar100", leader=False, model_num=2):
    """A common student (leader=False) or the leader (with its TransFusion head)."""
    check_model_name(model, dataset)
    return MODELS[dataset][model](num_classes=NUM_CLASSES[dataset], leader=leader, model_num=model_num)


def create_fusion_module(net, dataset="cifar100", model_num=2):
    """The FusionModule sized from a built backbone NET (its last map's channels and spatial size)."""
    return FusionModule(net.last_channels, NUM_CLASSES[dataset], net.last_spatial, model_num)


def create_decoder(model, net, num_maps):
    """The self-distillation decoder for backbone NET with NUM_MAPS hooked maps (num_maps - 1 stages)."""
    channels = DECODER_CHANNELS.get(model) or halving_channels(net.last_channels, num_maps - 1)
    return SelfDistillationModel(channels)


__all__ = ["CIFAR_MODELS", "IMAGENET_MODELS", "MODELS", "NUM_CLASSES", "create_model", "create_fusion_module",
           "create_decoder", "check_model_name", "FusionModule", "TransFusionModule", "SelfDistillationModel"]
