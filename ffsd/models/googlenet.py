"""GoogLeNet for CIFAR: inception blocks whose convs all have a bias and a BN."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ffsd.models.backbone import Backbone


def conv_bn_relu(in_planes, out_planes, kernel_size):
    return [nn.Conv2d(in_planes, out_planes, kernel_size, padding=kernel_size // 2), nn.BatchNorm2d(out_planes),
            nn.ReLU(True)]


class Inception(nn.Module):
    """Four branches concatenated: 1x1; 1x1-3x3; 1x1-3x3-3x3 (the "5x5"); maxpool3x3-1x1."""

    def __init__(self, in_planes, n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes):
        super().__init__()
        self.branch1x1 = nn.Sequential(*conv_bn_relu(in_planes, n1x1, 1))
        self.branch3x3 = nn.Sequential(*conv_bn_relu(in_planes, n3x3red, 1), *conv_bn_relu(n3x3red, n3x3, 3))
        self.branch5x5 = nn.Sequential(*conv_bn_relu(in_planes, n5x5red, 1), *conv_bn_relu(n5x5red, n5x5, 3),
                                       *conv_bn_relu(n5x5, n5x5, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *conv_bn_relu(in_planes, pool_planes, 1))

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch3x3(x), self.branch5x5(x), self.branch_pool(x)], 1)


class GoogLeNet(Backbone):
    """Feature maps: inception_b3 (480x32x32), inception_e4 (832x16x16), inception_b5 (1024x8x8)."""

    last_channels, last_spatial = 1024, 8

    def __init__(self, num_classes=100, leader=False, model_num=2):
        super().__init__()
        self.pre_layers = nn.Sequential(*conv_bn_relu(3, 192, 3))
        self.inception_a3 = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception_b3 = Inception(256, 128, 128, 192, 32, 96, 64)
        self.inception_a4 = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception_b4 = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception_c4 = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception_d4 = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception_e4 = Inception(528, 256, 160, 320, 32, 128, 128)
        self.inception_a5 = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception_b5 = Inception(832, 384, 192, 384, 48, 128, 128)
        self.linear = nn.Linear(1024, num_classes)
        self.finish_init(leader, model_num)

    def features(self, x):
        f1 = self.inception_b3(self.inception_a3(self.pre_layers(x)))
        x = F.max_pool2d(f1, 3, stride=2, padding=1)
        for name in ("a4", "b4", "c4", "d4"):
            x = getattr(self, f"inception_{name}")(x)
        f2 = self.inception_e4(x)
        x = F.max_pool2d(f2, 3, stride=2, padding=1)
        f3 = self.inception_b5(self.inception_a5(x))
        return [f1, f2, f3]

    def classify(self, last):
        return self.linear(F.avg_pool2d(last, 8, stride=1).flatten(1))
