"""Wide ResNets for CIFAR (WRN-16-2, WRN-40-2, WRN-28-10): pre-activation blocks with biased convs."""
import torch.nn as nn
import torch.nn.functional as F

from ffsd.models.backbone import Backbone


class WideBasic(nn.Module):
    """BN-ReLU-conv3x3-dropout-BN-ReLU-conv3x3(stride) plus a biased conv1x1 shortcut (no BN) when the shape
    changes. The stride sits on the second conv, as released."""

    def __init__(self, in_planes, planes, dropout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True))

    def forward(self, x):
        # In place on BN and conv outputs (autograd keeps BN's and the convs' inputs, not their outputs); the
        # block's input X is never written. The same values as out-of-place ops, with fewer fresh buffers.
        out = self.dropout(self.conv1(F.relu(self.bn1(x), inplace=True)))
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        out += self.shortcut(x)
        return out


class WideResNet(Backbone):
    """conv3x3(16, bias), three stages of (depth-4)/6 blocks at widths 16k/32k/64k, BN(momentum 0.9)-ReLU, avg
    pool 8, linear. Feature maps: layer1, layer2 (stage outputs, pre-activation) and relu1 (the pooled map)."""

    last_spatial = 8

    def __init__(self, depth, widen_factor, dropout=0.0, num_classes=100, leader=False, model_num=2):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"Wide-ResNet depth must be 6n+4 (16, 22, 28, 40, ...); got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.last_channels = widths[3]
        print(f"| Wide-Resnet {depth}x{widen_factor}")  # the authors' constructor prints this
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=True)
        in_planes = widths[0]
        for i, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), 1):
            blocks = [WideBasic(in_planes, planes, dropout, stride)]
            blocks += [WideBasic(planes, planes, dropout) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.bn1 = nn.BatchNorm2d(widths[3], momentum=0.9)  # released value: a very fast running average
        self.linear = nn.Linear(widths[3], num_classes)
        self.finish_init(leader, model_num)

    def features(self, x):
        f1 = self.layer1(self.conv1(x))
        f2 = self.layer2(f1)
        return [f1, f2, F.relu(self.bn1(self.layer3(f2)), inplace=True)]

    def classify(self, last):
        return self.linear(F.avg_pool2d(last, 8).flatten(1))
