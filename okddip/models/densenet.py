"""DenseNet-BC for CIFAR as in the released code ("densenetd40k12" = DenseNet-BC-40-12, 0.176 M parameters).

Dense layer BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k) on the concatenation of every earlier feature map; transitions
BN-ReLU-conv1x1(x0.5)-avgpool2; 3x3 stem with 2k channels; final BN-ReLU-8x8 average pool-Linear.

The released module layout and key names: `features` (a Sequential of conv0, denseblock1, transition1, denseblock2,
transition2, and in the plain network denseblock3 and norm_final), each dense block holding denselayer1..n (norm1,
relu1, conv1, norm2, relu2, conv2), each transition norm, relu, conv, pool; then `classifier`.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> (growth rate, layers per block)
CONFIGS = {"densenetd40k12": (12, 6), "densenetd100k12": (12, 16), "densenetd100k40": (40, 16),
           "densenetd190k12": (12, 31)}
POOL = 8  # the final average pool of the released code (8x8 maps at 32 px)


class DenseLayer(nn.Module):
    def __init__(self, in_ch, growth):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, *features):
        out = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(out)))


class DenseBlock(nn.Module):
    """Each layer sees the concatenation of the block input and every earlier layer's output (as released: one
    concatenation per layer, not a chain, which fixes the order in which gradients add up)."""

    def __init__(self, in_ch, growth, n):
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", DenseLayer(in_ch + i * growth, growth))
        self.out_channels = in_ch + n * growth

    def forward(self, x):
        features = [x]
        for layer in self.children():
            features.append(layer(*features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, in_ch):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_ch))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_ch, in_ch // 2, 1, bias=False))
        self.add_module("pool", nn.AvgPool2d(2, 2))


def dense_trunk(arch):
    """`features` through the second transition; returns (features, channels out, growth, layers per block)."""
    growth, n = CONFIGS[arch]
    features = nn.Sequential(OrderedDict([("conv0", nn.Conv2d(3, 2 * growth, 3, padding=1, bias=False))]))
    ch = 2 * growth
    for i in (1, 2):
        block = DenseBlock(ch, growth, n)
        features.add_module(f"denseblock{i}", block)
        features.add_module(f"transition{i}", Transition(block.out_channels))
        ch = block.out_channels // 2
    return features, ch, growth, n


def init_densenet(module):
    """Conv kaiming_normal (fan_in), BN 1/0, Linear bias 0 (weight keeps the default init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.constant_(m.bias, 0)


class DenseNet(nn.Module):
    def __init__(self, arch, num_classes=10, KD=False):
        super().__init__()
        self.KD = KD
        self.features, ch, growth, n = dense_trunk(arch)
        block = DenseBlock(ch, growth, n)
        self.features.add_module("denseblock3", block)
        self.features.add_module("norm_final", nn.BatchNorm2d(block.out_channels))
        self.classifier = nn.Linear(block.out_channels, num_classes)
        self.feature_dim = block.out_channels
        init_densenet(self)

    def forward(self, x):
        x = F.relu(self.features(x), inplace=True)
        h = F.avg_pool2d(x, kernel_size=POOL).flatten(1)
        logits = self.classifier(h)
        return (h, logits) if self.KD else logits
