"""Wide ResNet (pre-activation) WRN-16-2 / 40-2 / 28-4 for CIFAR, alone and with two auxiliary branches.

Backbone: conv3x3(3->16) -> group1 (16k) -> group2 (32k, /2) -> group3 (64k, /2) -> BN -> ReLU -> pool -> Linear.
The stage maps handed to the auxiliary branches are the raw (not activated) group outputs.
"""
import torch.nn as nn
import torch.nn.functional as F

from mcl.models.resnet_cifar import init_auxiliary


class WideBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        # a projection shortcut reads the activated input, an identity shortcut the raw one
        return out + (x if self.equal_in_out else self.convShortcut(activated))


class WideGroup(nn.Module):
    def __init__(self, blocks, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(blocks)])

    def forward(self, x):
        return self.layer(x)


def _blocks(depth):
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth {depth} is impossible: depth - 4 must be a multiple of 6 (16, 22, 28, 40, ...)")
    return (depth - 4) // 6


class WideResNetCIFAR(nn.Module):
    """The deployed WRN (same keys as a baseline and inside a pair)."""

    def __init__(self, depth, widen_factor, num_classes=100):
        super().__init__()
        n, k = _blocks(depth), widen_factor
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1 = WideGroup(n, widths[0], widths[1], 1)
        self.block2 = WideGroup(n, widths[1], widths[2], 2)
        self.block3 = WideGroup(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        init_auxiliary(self)  # the WRN code uses the same init everywhere: N(0, sqrt(2/(k*k*out))), BN 1/0, bias 0

    def forward(self, x, return_stages=False):
        f1 = self.block1(self.conv1(x))
        f2 = self.block2(f1)
        out = F.relu(self.bn1(self.block3(f2)))
        pooled = F.avg_pool2d(out, 8).flatten(1)  # the authors' fixed 8x8 pool (CIFAR maps)
        logits = self.fc(pooled)
        if return_stages:
            return [f1, f2], pooled, logits
        return pooled, logits


class WideResNetAuxiliaryBranches(nn.Module):
    """Branch 1 re-runs groups 2 and 3 on the group-1 map, branch 2 group 3 on the group-2 map; each then its own
    BN (`bn1`, `bn2`, modules of their own as in the authors' Auxiliary_Classifier) + ReLU, pool, classifier."""

    def __init__(self, depth, widen_factor, num_classes=100):
        super().__init__()
        n, k = _blocks(depth), widen_factor
        self.block_extractor1 = nn.Sequential(WideGroup(n, 16 * k, 32 * k, 2), WideGroup(n, 32 * k, 64 * k, 2))
        self.block_extractor2 = nn.Sequential(WideGroup(n, 32 * k, 64 * k, 2))
        self.bn1 = nn.BatchNorm2d(64 * k)
        self.bn2 = nn.BatchNorm2d(64 * k)
        self.fc1 = nn.Linear(64 * k, num_classes)
        self.fc2 = nn.Linear(64 * k, num_classes)
        init_auxiliary(self)

    def forward(self, stages):
        maps = [F.relu(self.bn1(self.block_extractor1(stages[0]))), F.relu(self.bn2(self.block_extractor2(stages[1])))]
        pooled = [F.adaptive_avg_pool2d(m, 1).flatten(1) for m in maps]
        return pooled, [self.fc1(pooled[0]), self.fc2(pooled[1])]


class WideResNetAuxiliary(nn.Module):
    def __init__(self, depth, widen_factor, num_classes=100):
        super().__init__()
        self.backbone = WideResNetCIFAR(depth, widen_factor, num_classes)
        self.auxiliary_classifier = WideResNetAuxiliaryBranches(depth, widen_factor, num_classes)

    def forward(self, x):
        stages, pooled, logits = self.backbone(x, return_stages=True)
        aux_pooled, aux_logits = self.auxiliary_classifier(stages)
        return aux_pooled + [pooled], aux_logits + [logits]
