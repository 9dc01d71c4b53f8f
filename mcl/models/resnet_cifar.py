"""CIFAR ResNet-32/56 (BasicBlock) and the authors' bottleneck ResNet-110, alone and with two auxiliary branches.

Backbone: conv3x3(3->16) -> BN -> ReLU -> layer1 (16e) -> layer2 (32e, /2) -> layer3 (64e, /2) -> pool -> Linear.
Auxiliary branch 1 re-runs fresh copies of layer2 + layer3 on the layer1 output; branch 2 a fresh layer3 on the
layer2 output. Heads are returned as [branch1, branch2, backbone].
"""
import math

import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        # in place on BatchNorm outputs (BatchNorm's backward keeps its input, not its output; ReLU's keeps its
        # result): the same values and gradients without a fresh activation-sized buffer each. x is never written.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out, inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 ("v1.5")
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        # in place on BatchNorm outputs, as BasicBlock
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out, inplace=True)


def make_layer(block, in_planes, planes, blocks, stride):
    downsample = None
    if stride != 1 or in_planes != planes * block.expansion:
        downsample = nn.Sequential(nn.Conv2d(in_planes, planes * block.expansion, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes * block.expansion))
    layers = [block(in_planes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


DEPTHS = {32: (BasicBlock, 5), 56: (BasicBlock, 9), 110: (Bottleneck, 12)}


def _block_config(depth):
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth {depth} is not one of the authors' CIFAR ResNets; valid depths: "
                         f"{sorted(DEPTHS)} (32 and 56 BasicBlock, 110 Bottleneck)")
    return DEPTHS[depth]


class ResNetCIFAR(nn.Module):
    """The deployed network. As a baseline its classifier is `classifier`; inside a pair it is `fc`
    (`classifier_name`), the only key difference between the two. forward(x, return_stages=True) also returns the
    layer1 and layer2 maps the auxiliary branches read."""

    def __init__(self, depth, num_classes=100, classifier_name="classifier"):
        super().__init__()
        block, n = _block_config(depth)
        self.classifier_name = classifier_name
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = make_layer(block, 16, 16, n, 1)
        self.layer2 = make_layer(block, 16 * block.expansion, 32, n, 2)
        self.layer3 = make_layer(block, 32 * block.expansion, 64, n, 2)
        self.feature_dim = 64 * block.expansion
        setattr(self, classifier_name, nn.Linear(self.feature_dim, num_classes))
        init_kaiming(self)

    def forward(self, x, return_stages=False):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        pooled = F.adaptive_avg_pool2d(self.layer3(f2), 1).flatten(1)
        logits = getattr(self, self.classifier_name)(pooled)
        if return_stages:
            return [f1, f2], pooled, logits
        return pooled, logits


def init_kaiming(module):
    """Kaiming normal (fan_out, ReLU gain) convs, BN 1/0; Linear layers keep PyTorch's default init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_auxiliary(module):
    """Auxiliary-branch init of the CIFAR ResNet/WRN code: conv N(0, sqrt(2/(k*k*out))), BN 1/0, Linear bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.bias.data.zero_()


class ResNetAuxiliaryBranches(nn.Module):
    def __init__(self, depth, num_classes=100):
        super().__init__()
        block, n = _block_config(depth)
        e = block.expansion
        self.block_extractor1 = nn.Sequential(make_layer(block, 16 * e, 32, n, 2), make_layer(block, 32 * e, 64, n, 2))
        self.block_extractor2 = nn.Sequential(make_layer(block, 32 * e, 64, n, 2))
        self.fc1 = nn.Linear(64 * e, num_classes)
        self.fc2 = nn.Linear(64 * e, num_classes)
        init_auxiliary(self)

    def forward(self, stages):
        pooled = [F.adaptive_avg_pool2d(self.block_extractor1(stages[0]), 1).flatten(1),
                  F.adaptive_avg_pool2d(self.block_extractor2(stages[1]), 1).flatten(1)]
        return pooled, [self.fc1(pooled[0]), self.fc2(pooled[1])]


class ResNetAuxiliary(nn.Module):
    """backbone + auxiliary_classifier; forward -> (pooled features, logits), each [branch1, branch2, backbone]."""

    def __init__(self, depth, num_classes=100):
        super().__init__()
        self.backbone = ResNetCIFAR(depth, num_classes, classifier_name="fc")
        self.auxiliary_classifier = ResNetAuxiliaryBranches(depth, num_classes)

    def forward(self, x):
        stages, pooled, logits = self.backbone(x, return_stages=True)
        aux_pooled, aux_logits = self.auxiliary_classifier(stages)
        return aux_pooled + [pooled], aux_logits + [logits]
