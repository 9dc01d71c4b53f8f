"""DenseNet-40-12 for CIFAR as released: no bottleneck, no compression (transitions keep the channel count)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ffsd.models.backbone import Backbone


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3(growth), concatenated to its input."""

    def __init__(self, in_planes, growth_rate, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x), inplace=True))  # on the BN output: X is concatenated below
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return torch.cat((x, out), 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1-avgpool2."""

    def __init__(self, in_planes, out_planes):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv1(F.relu(self.bn1(x), inplace=True)), 2)


class DenseNet(Backbone):
    """conv3x3(2*growth), three dense blocks of (depth-4)/3 layers with transitions, BN-ReLU, avg pool 8, fc.
    Feature maps: dense1 (168x32x32), dense2 (312x16x16), relu (456x8x8) for depth 40, growth 12."""

    last_spatial = 8

    def __init__(self, depth=40, growth_rate=12, compression_rate=1, drop_rate=0.0, num_classes=100, leader=False,
                 model_num=2):
        super().__init__()
        if (depth - 4) % 3:
            raise ValueError(f"DenseNet depth must be 3n+4 (40, 100, ...); got {depth}")
        n = (depth - 4) // 3
        planes = growth_rate * 2
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        for i in (1, 2, 3):
            self.add_module(f"dense{i}", nn.Sequential(
                *[DenseLayer(planes + k * growth_rate, growth_rate, drop_rate) for k in range(n)]))
            planes += n * growth_rate
            if i < 3:
                out_planes = planes // compression_rate
                self.add_module(f"trans{i}", Transition(planes, out_planes))
                planes = out_planes
        self.last_channels = planes
        self.bn = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)
        self.finish_init(leader, model_num)

    def features(self, x):
        f1 = self.dense1(self.conv1(x))
        f2 = self.dense2(self.trans1(f1))
        f3 = F.relu(self.bn(self.dense3(self.trans2(f2))), inplace=True)
        return [f1, f2, f3]

    def classify(self, last):
        return self.fc(F.avg_pool2d(last, 8).flatten(1))
