"""The CIFAR MobileNet (v1) with DCM's two auxiliary classifiers (the authors' `wrn_mobi/mobilenet.py`).

A CIFAR variant with a stride-1 stem and a stride-1 layer1 (256 channels at 32x32), unlike the usual CIFAR
MobileNet. Module names and registration order follow the released file, so `state_dict()` keys equal the released
ones (without DataParallel's `module.` prefix) and PyTorch's default init draws the RNG in the released order.

    conv1, bn1                 stem 3x3 conv 3->32
    layer1                     DW 32->64, 64->128, 128->128, 128->256, 256->256 (all stride 1)
    layer2                     DW 256->512 s2, 5 x DW 512->512
    layer3                     DW 512->1024 s2, DW 1024->1024; avg-pool 8; linear 1024->C
    ep1_layer2, ep1_layer3     aux 1 on the layer1 output: DW 256->512 s2, 3 x DW 512->512; DW 512->1024 s2, 1024->1024
    ep1_linear
    ep2_layer3, ep2_linear     aux 2 on the layer2 output: DW 512->2048 s2, DW 2048->2048 (double width)
"""
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Depthwise 3x3 conv-BN-ReLU, then pointwise 1x1 conv-BN-ReLU."""

    def __init__(self, in_planes, out_planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, in_planes, 3, stride, 1, groups=in_planes, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv2 = nn.Conv2d(in_planes, out_planes, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)

    def forward(self, x):
        # ReLU in place on the BN outputs: fresh tensors that no backward reads (BN's backward reads its input).
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True))), inplace=True)


def layers(cfg, in_planes):
    """nn.Sequential of Blocks from a list of (out_planes, stride)."""
    blocks = []
    for out_planes, stride in cfg:
        blocks.append(Block(in_planes, out_planes, stride))
        in_planes = out_planes
    return nn.Sequential(*blocks)


def pool_flat(x):
    return F.avg_pool2d(x, 8).flatten(1)


class MobileNet(nn.Module):
    def __init__(self, num_classes=100, aux=True):
        super().__init__()
        self.num_classes, self.aux = num_classes, aux
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.layer1 = layers([(64, 1), (128, 1), (128, 1), (256, 1), (256, 1)], 32)
        self.layer2 = layers([(512, 2)] + [(512, 1)] * 5, 256)
        self.layer3 = layers([(1024, 2), (1024, 1)], 512)
        self.linear = nn.Linear(1024, num_classes)
        if aux:
            self.ep1_layer2 = layers([(512, 2)] + [(512, 1)] * 3, 256)
            self.ep1_layer3 = layers([(1024, 2), (1024, 1)], 512)
            self.ep1_linear = nn.Linear(1024, num_classes)
            self.ep2_layer3 = layers([(2048, 2), (2048, 1)], 512)
            self.ep2_linear = nn.Linear(2048, num_classes)

    def head_names(self):
        return ("aux1", "aux2", "final") if self.aux else ("final",)

    def forward(self, x):
        l1 = self.layer1(F.relu(self.bn1(self.conv1(x)), inplace=True))
        l2 = self.layer2(l1)
        final = self.linear(pool_flat(self.layer3(l2)))
        if not self.aux:
            return (final,)
        aux1 = self.ep1_linear(pool_flat(self.ep1_layer3(self.ep1_layer2(l1))))
        aux2 = self.ep2_linear(pool_flat(self.ep2_layer3(l2)))
        return aux1, aux2, final

    def deployed_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith(("ep1_", "ep2_"))]
