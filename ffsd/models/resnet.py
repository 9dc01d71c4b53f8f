"""ResNets: the CIFAR ResNet-20/32/56 (3 stages, option-B shortcuts) and the ImageNet ResNet-18/34."""
import torch.nn as nn
import torch.nn.functional as F

from ffsd.models.backbone import Backbone
from ffsd.models.init import reset_parameters_kaiming


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN plus the shortcut (conv1x1 + BN when the shape changes), then ReLU."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        # In place where autograd allows it (BN saves its input, ReLU its output; the block's input X is never
        # written): the same values as out-of-place ops, without fresh activation-sized buffers per step.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out, inplace=True)


def make_stage(in_planes, planes, blocks, stride):
    layers = [BasicBlock(in_planes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(Backbone):
    """conv3x3(16)-BN-ReLU, three stages of n blocks at widths 16/32/64, global average pool, fc.
    Feature maps: layer1 (16x32x32), layer2 (32x16x16), layer3 (64x8x8)."""

    last_channels, last_spatial = 64, 8

    def __init__(self, depth, num_classes=100, leader=False, model_num=2):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, ...); got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = make_stage(16, 16, n, 1)
        self.layer2 = make_stage(16, 32, n, 2)
        self.layer3 = make_stage(32, 64, n, 2)
        self.fc = nn.Linear(64, num_classes)
        self.finish_init(leader, model_num)

    def features(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        return [f1, f2, self.layer3(f2)]

    def classify(self, last):
        return self.fc(F.adaptive_avg_pool2d(last, 1).flatten(1))


class ImageNetResNet(Backbone):
    """The torchvision layout: conv7x7/2-BN-ReLU-maxpool, four stages at widths 64..512, average pool, fc.
    Feature maps: layer1 (64x56x56) ... layer4 (512x7x7)."""

    last_channels, last_spatial = 512, 7

    def __init__(self, blocks, num_classes=1000, leader=False, model_num=2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = make_stage(64, 64, blocks[0], 1)
        self.layer2 = make_stage(64, 128, blocks[1], 2)
        self.layer3 = make_stage(128, 256, blocks[2], 2)
        self.layer4 = make_stage(256, 512, blocks[3], 2)
        self.fc = nn.Linear(512, num_classes)
        self.finish_init(leader, model_num, init=reset_parameters_kaiming)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x)), inplace=True), 3, stride=2, padding=1)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3, self.layer4(f3)]

    def classify(self, last):
        return self.fc(F.adaptive_avg_pool2d(last, 1).flatten(1))
