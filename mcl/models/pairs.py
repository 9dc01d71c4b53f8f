"""Pairs of networks as the authors build them, and the name -> constructor tables of every script (CIFAR and
ImageNet).

Homogeneous pair: `module_list` of `number_net` independently initialised `<Family>Auxiliary` networks.
Heterogeneous pair (CrossNets): `net1` and `net2`, each a homogeneous container of one network, so keys read
`net1.module_list.0.*`. Both return (features, logits) with features[i][j] / logits[i][j] of network i, head j.
"""
from functools import partial

import torch.nn as nn

from mcl.models.hcgnet_cifar import HCGNetAuxiliary, HCGNetCIFAR
from mcl.models.resnet_cifar import ResNetAuxiliary, ResNetCIFAR
from mcl.models.resnet_imagenet import ResNetImageNet, ResNetImageNetAuxiliary
from mcl.models.shufflenetv2_cifar import ShuffleNetV2Auxiliary, ShuffleNetV2CIFAR
from mcl.models.shufflenetv2_imagenet import ShuffleNetV2ImageNet, ShuffleNetV2ImageNetAuxiliary
from mcl.models.wrn_cifar import WideResNetAuxiliary, WideResNetCIFAR


class HomogeneousPair(nn.Module):
    def __init__(self, make_network, number_net=2):
        super().__init__()
        self.module_list = nn.ModuleList([make_network() for _ in range(number_net)])

    def forward(self, x):
        features, logits = [], []
        for net in self.module_list:
            f, z = net(x)
            features.append(f)
            logits.append(z)
        return features, logits


class CrossNets(nn.Module):
    def __init__(self, make_net1, make_net2):
        super().__init__()
        self.net1 = HomogeneousPair(make_net1, 1)
        self.net2 = HomogeneousPair(make_net2, 1)

    def forward(self, x):
        f1, z1 = self.net1(x)
        f2, z2 = self.net2(x)
        return f1 + f2, z1 + z2

    @property
    def networks(self):
        return [self.net1.module_list[0], self.net2.module_list[0]]


def networks_of(pair):
    """The `<Family>Auxiliary` networks of a pair, in order."""
    return pair.networks if isinstance(pair, CrossNets) else list(pair.module_list)


# One network with its auxiliary branches (CIFAR), by the authors' short names
CIFAR_AUXILIARY = {
    "resnet32": partial(ResNetAuxiliary, 32), "resnet56": partial(ResNetAuxiliary, 56),
    "resnet110": partial(ResNetAuxiliary, 110),
    "wrn_16_2": partial(WideResNetAuxiliary, 16, 2), "wrn_40_2": partial(WideResNetAuxiliary, 40, 2),
    "wrn_28_4": partial(WideResNetAuxiliary, 28, 4),
    "ShuffleNetV2_05x": partial(ShuffleNetV2Auxiliary, 0.5), "ShuffleNetV2_1x": partial(ShuffleNetV2Auxiliary, 1.0),
    "hcgnet_A1": partial(HCGNetAuxiliary, "A1"), "hcgnet_A2": partial(HCGNetAuxiliary, "A2"),
}

CIFAR_BASELINES = {
    "resnet32_cifar": partial(ResNetCIFAR, 32), "resnet56_cifar": partial(ResNetCIFAR, 56),
    "resnet110_cifar": partial(ResNetCIFAR, 110),
    "wrn_16_2_cifar": partial(WideResNetCIFAR, 16, 2), "wrn_40_2_cifar": partial(WideResNetCIFAR, 40, 2),
    "wrn_28_4_cifar": partial(WideResNetCIFAR, 28, 4),
    "ShuffleNetV2_05x_cifar": partial(ShuffleNetV2CIFAR, 0.5), "ShuffleNetV2_1x_cifar": partial(ShuffleNetV2CIFAR, 1.0),
    "hcgnet_A1_cifar": partial(HCGNetCIFAR, "A1"), "hcgnet_A2_cifar": partial(HCGNetCIFAR, "A2"),
}

CIFAR_HETEROGENEOUS = {  # network order as in the authors' factories
    "lmcl_res32_res110_cifar": ("resnet32", "resnet110"),
    "lmcl_res56_res110_cifar": ("resnet56", "resnet110"),
    "lmcl_wrn_16_2_wrn_40_2_cifar": ("wrn_16_2", "wrn_40_2"),
    "lmcl_wrn_40_2_wrn_28_4_cifar": ("wrn_40_2", "wrn_28_4"),
    "lmcl_res56_wrn_40_2_cifar": ("resnet56", "wrn_40_2"),
    "lmcl_res110_wrn_28_4_cifar": ("resnet110", "wrn_28_4"),
    "lmcl_shufflev2_res110_cifar": ("ShuffleNetV2_1x", "resnet110"),
    "lmcl_shufflev2_wrn_40_2_cifar": ("ShuffleNetV2_1x", "wrn_40_2"),
}
CIFAR_HOMOGENEOUS = [f"lmcl_{name}_cifar" for name in CIFAR_AUXILIARY]
CIFAR_PAIRS = CIFAR_HOMOGENEOUS + list(CIFAR_HETEROGENEOUS)


def _unknown(kind, name, valid):
    return ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}")


def build_cifar_pair(arch, num_classes=100, number_net=2):
    """`lmcl_*_cifar` pairs; heterogeneous factories ignore number_net and always build two networks."""
    if arch in CIFAR_HETEROGENEOUS:
        a, b = CIFAR_HETEROGENEOUS[arch]
        return CrossNets(partial(CIFAR_AUXILIARY[a], num_classes=num_classes),
                         partial(CIFAR_AUXILIARY[b], num_classes=num_classes))
    short = arch.removeprefix("lmcl_").removesuffix("_cifar")
    if arch not in CIFAR_HOMOGENEOUS:
        raise _unknown("L-MCL CIFAR architecture", arch, CIFAR_PAIRS)
    if number_net < 2:
        raise ValueError(f"--number-net {number_net}: mutual learning needs at least 2 networks")
    return HomogeneousPair(partial(CIFAR_AUXILIARY[short], num_classes=num_classes), number_net)


def build_cifar_baseline(arch, num_classes=100):
    if arch not in CIFAR_BASELINES:
        raise _unknown("CIFAR baseline architecture", arch, list(CIFAR_BASELINES))
    return CIFAR_BASELINES[arch](num_classes=num_classes)


# ImageNet: 4 heads per network (three auxiliary branches + the backbone)
IMAGENET_AUXILIARY = {
    "resnet18": partial(ResNetImageNetAuxiliary, 18), "resnet34": partial(ResNetImageNetAuxiliary, 34),
    "resnet50": partial(ResNetImageNetAuxiliary, 50), "ShuffleNetV2_1x": ShuffleNetV2ImageNetAuxiliary,
}
IMAGENET_BASELINES = {
    "resnet18_imagenet": partial(ResNetImageNet, 18), "resnet34_imagenet": partial(ResNetImageNet, 34),
    "resnet50_imagenet": partial(ResNetImageNet, 50), "ShuffleNetV2_1x_imagenet": ShuffleNetV2ImageNet,
}
IMAGENET_HETEROGENEOUS = {  # network order as in the authors' factories (note the second one)
    "lmcl_res18_shufflenetv2_1x_imagenet": ("resnet18", "ShuffleNetV2_1x"),
    "lmcl_res50_shufflenetv2_1x_imagenet": ("ShuffleNetV2_1x", "resnet50"),
    "lmcl_res18_res50_imagenet": ("resnet18", "resnet50"),
}
IMAGENET_HOMOGENEOUS = [f"lmcl_{name}_imagenet" for name in IMAGENET_AUXILIARY]
IMAGENET_PAIRS = IMAGENET_HOMOGENEOUS + list(IMAGENET_HETEROGENEOUS)


def build_imagenet_pair(arch, num_classes=1000, number_net=2):
    """`lmcl_*_imagenet` pairs (heterogeneous ones always hold two networks)."""
    if arch in IMAGENET_HETEROGENEOUS:
        a, b = IMAGENET_HETEROGENEOUS[arch]
        return CrossNets(partial(IMAGENET_AUXILIARY[a], num_classes=num_classes),
                         partial(IMAGENET_AUXILIARY[b], num_classes=num_classes))
    if arch not in IMAGENET_HOMOGENEOUS:
        raise _unknown("L-MCL ImageNet architecture", arch, IMAGENET_PAIRS)
    if number_net < 2:
        raise ValueError(f"--number-net {number_net}: mutual learning needs at least 2 networks")
    short = arch.removeprefix("lmcl_").removesuffix("_imagenet")
    return HomogeneousPair(partial(IMAGENET_AUXILIARY[short], num_classes=num_classes), number_net)


def build_imagenet_baseline(arch, num_classes=1000):
    if arch not in IMAGENET_BASELINES:
        raise _unknown("ImageNet baseline architecture", arch, list(IMAGENET_BASELINES))
    return IMAGENET_BASELINES[arch](num_classes=num_classes)
