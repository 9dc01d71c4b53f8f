"""ShuffleNetV2 0.5x / 1x for CIFAR (stride-1 stem, no max-pool), alone and with two auxiliary branches.
PyTorch default initialisation everywhere, as the authors' code."""
import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTHS = {0.5: (48, 96, 192, 1024), 1.0: (116, 232, 464, 1024)}
BLOCKS = (3, 7, 3)


def channel_shuffle(x, groups=2):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    """Stride-1 unit: half the channels pass through, the other half go 1x1 -> dw3x3 -> 1x1; concat; shuffle."""

    def __init__(self, channels):
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        c = x.size(1) // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1))


class DownBlock(nn.Module):
    """Stride-2 unit: both halves are computed from the whole input (left: dw3x3/2 -> 1x1, right: 1x1 -> dw3x3/2
    -> 1x1); concat; shuffle."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1))


def make_stage(in_channels, out_channels, blocks):
    return nn.Sequential(DownBlock(in_channels, out_channels), *[ShuffleBlock(out_channels) for _ in range(blocks)])


def _widths(width):
    if width not in WIDTHS:
        raise ValueError(f"ShuffleNetV2 width {width} unknown; valid: {sorted(WIDTHS)}")
    return WIDTHS[width]


class ShuffleNetV2CIFAR(nn.Module):
    """The deployed network (same keys as a baseline and inside a pair)."""

    def __init__(self, width=1.0, num_classes=100):
        super().__init__()
        c1, c2, c3, c_last = _widths(width)
        self.conv1 = nn.Conv2d(3, 24, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.layer1 = make_stage(24, c1, BLOCKS[0])
        self.layer2 = make_stage(c1, c2, BLOCKS[1])
        self.layer3 = make_stage(c2, c3, BLOCKS[2])
        self.conv2 = nn.Conv2d(c3, c_last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_last)
        self.linear = nn.Linear(c_last, num_classes)
        self.feature_dim = c_last

    def forward(self, x, return_stages=False):
        x = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        out = F.relu(self.bn2(self.conv2(self.layer3(f2))))
        pooled = F.adaptive_avg_pool2d(out, 1).flatten(1)
        logits = self.linear(pooled)
        if return_stages:
            return [f1, f2], pooled, logits
        return pooled, logits


class ShuffleNetV2AuxiliaryBranches(nn.Module):
    def __init__(self, width=1.0, num_classes=100):
        super().__init__()
        c1, c2, c3, c_last = _widths(width)
        self.block_extractor1 = nn.Sequential(make_stage(c1, c2, BLOCKS[1]), make_stage(c2, c3, BLOCKS[2]),
                                              nn.Conv2d(c3, c_last, 1, bias=False), nn.BatchNorm2d(c_last),
                                              nn.ReLU(inplace=True))
        self.block_extractor2 = nn.Sequential(make_stage(c2, c3, BLOCKS[2]), nn.Conv2d(c3, c_last, 1, bias=False),
                                              nn.BatchNorm2d(c_last), nn.ReLU(inplace=True))
        self.fc1 = nn.Linear(c_last, num_classes)
        self.fc2 = nn.Linear(c_last, num_classes)

    def forward(self, stages):
        pooled = [F.adaptive_avg_pool2d(self.block_extractor1(stages[0]), 1).flatten(1),
                  F.adaptive_avg_pool2d(self.block_extractor2(stages[1]), 1).flatten(1)]
        return pooled, [self.fc1(pooled[0]), self.fc2(pooled[1])]


class ShuffleNetV2Auxiliary(nn.Module):
    def __init__(self, width=1.0, num_classes=100):
        super().__init__()
        self.backbone = ShuffleNetV2CIFAR(width, num_classes)
        self.auxiliary_classifier = ShuffleNetV2AuxiliaryBranches(width, num_classes)

    def forward(self, x):
        stages, pooled, logits = self.backbone(x, return_stages=True)
        aux_pooled, aux_logits = self.auxiliary_classifier(stages)
        return aux_pooled + [pooled], aux_logits + [logits]
