"""HCGNet-A1 / A2 for CIFAR (hybrid connectivity with gated SMG modules), alone and with two auxiliary branches.
PyTorch default initialisation everywhere, as the authors' code.

Backbone: conv3x3(3 -> 2*g1) -> HybridBlock1 -> Transition1 (= stage-1 map) -> HybridBlock2 -> Transition2 (= stage-2
map) -> HybridBlock3 -> BN -> ReLU -> pool -> Linear.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

GROWTH = {"A1": (12, 24, 36), "A2": (24, 36, 64)}
MODULES_PER_BLOCK = 8
BOTTLENECK = 4


class BasicConv(nn.Sequential):
    """Pre-activation conv: BN(in) -> ReLU -> Conv (no bias)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_channels))
        self.add_module("relu", nn.ReLU(inplace=False))
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                          bias=False))


def spatial_pool(x, context_conv):
    """Attention pooling: softmax over all H*W positions of a 1-channel map, then the weighted sum of x -> (B, C)."""
    b, c, h, w = x.shape
    weights = F.softmax(context_conv(x).view(b, 1, h * w), dim=2)  # (B, 1, HW)
    return torch.bmm(x.view(b, c, h * w), weights.transpose(1, 2)).view(b, c)


class Gate(nn.Module):
    """The SMG gating (shared by SMG modules, reduction 2, and transitions, reduction 4): a forget gate
    s = sigmoid(W2 tanh(BN(W1 pool(x)))) on x (hidden C/r), plus a per-channel mixture of two depthwise context vectors
    (dilation 1 and 2, attention hidden 2C/r) with softmax weights across the two branches: out = x * s + w3 v3 + w5 v5."""

    def __init__(self, channels, reduction):
        super().__init__()
        hidden, attention_hidden = channels // reduction, 2 * channels // reduction
        self.forget_context = nn.Conv2d(channels, 1, 1)
        self.forget_fc1 = nn.Linear(channels, hidden)
        self.forget_bn = nn.BatchNorm1d(hidden)
        self.forget_fc2 = nn.Linear(hidden, channels)
        self.branch3 = BasicConv(channels, channels, 3, padding=1, groups=channels)
        self.branch5 = BasicConv(channels, channels, 3, padding=2, dilation=2, groups=channels)
        self.context3 = nn.Conv2d(channels, 1, 1)
        self.context5 = nn.Conv2d(channels, 1, 1)
        self.attention_fc = nn.Linear(2 * channels, attention_hidden)
        self.attention_bn = nn.BatchNorm1d(attention_hidden)
        self.attention_head3 = nn.Linear(attention_hidden, channels)
        self.attention_head5 = nn.Linear(attention_hidden, channels)

    def forward(self, x):
        pooled = spatial_pool(x, self.forget_context)
        forget = torch.sigmoid(self.forget_fc2(torch.tanh(self.forget_bn(self.forget_fc1(pooled)))))
        v3 = spatial_pool(self.branch3(x), self.context3)
        v5 = spatial_pool(self.branch5(x), self.context5)
        a = torch.tanh(self.attention_bn(self.attention_fc(torch.cat([v3, v5], 1))))
        w = F.softmax(torch.stack([self.attention_head3(a), self.attention_head5(a)], 0), dim=0)
        new = w[0] * v3 + w[1] * v5
        return x * forget[:, :, None, None] + new[:, :, None, None]


class SMG(nn.Module):
    """One densely connected module: returns concat[input, gated g new channels]."""

    def __init__(self, in_channels, growth):
        super().__init__()
        self.conv1x1 = BasicConv(in_channels, BOTTLENECK * growth, 1)
        self.conv3x3 = BasicConv(BOTTLENECK * growth, growth, 3, padding=1, groups=4)
        self.gate = Gate(growth, reduction=2)

    def forward(self, x):
        return torch.cat([x, self.gate(self.conv3x3(self.conv1x1(x)))], 1)


class Transition(nn.Module):
    """Halves the width and the resolution: BasicConv1x1 -> BasicConv3x3/2 -> gating (reduction 4)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = in_channels - (in_channels - out_channels) // 2
        self.conv1x1 = BasicConv(in_channels, mid, 1)
        self.conv3x3 = BasicConv(mid, out_channels, 3, stride=2, padding=1)
        self.gate = Gate(out_channels, reduction=4)

    def forward(self, x):
        return self.gate(self.conv3x3(self.conv1x1(x)))


def hybrid_block(in_channels, growth):
    return nn.Sequential(*[SMG(in_channels + i * growth, growth) for i in range(MODULES_PER_BLOCK)])


def _widths(variant):
    if variant not in GROWTH:
        raise ValueError(f"HCGNet variant {variant!r} unknown; valid: {sorted(GROWTH)}")
    g1, g2, g3 = GROWTH[variant]
    c0 = 2 * g1
    hb1 = c0 + MODULES_PER_BLOCK * g1
    t1 = hb1 // 2
    hb2 = t1 + MODULES_PER_BLOCK * g2
    t2 = hb2 // 2
    hb3 = t2 + MODULES_PER_BLOCK * g3
    return (g1, g2, g3), (c0, hb1, t1, hb2, t2, hb3)


class HCGNetCIFAR(nn.Module):
    """The deployed network. As a baseline (`nested=True`) the blocks live under `features.` like the authors'
    baseline; inside a pair they are top-level attributes (`features.conv0` stays nested), as in their pair code."""

    def __init__(self, variant="A1", num_classes=100, nested=True):
        super().__init__()
        (g1, g2, g3), (c0, hb1, t1, hb2, t2, hb3) = _widths(variant)
        self.nested = nested
        blocks = [("HybridBlock1", hybrid_block(c0, g1)), ("Transition1", Transition(hb1, t1)),
                  ("HybridBlock2", hybrid_block(t1, g2)), ("Transition2", Transition(hb2, t2)),
                  ("HybridBlock3", hybrid_block(t2, g3)), ("norm5", nn.BatchNorm2d(hb3))]
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, c0, 3, 1, 1, bias=False))
        parent = self.features if nested else self
        for name, module in blocks:
            parent.add_module(name, module)
        self.classifier = nn.Linear(hb3, num_classes)
        self.feature_dim = hb3

    def _part(self, name):
        return getattr(self.features if self.nested else self, name)

    def forward(self, x, return_stages=False):
        x = self._part("HybridBlock1")(self.features.conv0(x))
        f1 = self._part("Transition1")(x)
        f2 = self._part("Transition2")(self._part("HybridBlock2")(f1))
        out = F.relu(self._part("norm5")(self._part("HybridBlock3")(f2)))
        pooled = F.adaptive_avg_pool2d(out, 1).flatten(1)
        logits = self.classifier(pooled)
        if return_stages:
            return [f1, f2], pooled, logits
        return pooled, logits


class HCGNetAuxiliaryBranches(nn.Module):
    def __init__(self, variant="A1", num_classes=100):
        super().__init__()
        (g1, g2, g3), (c0, hb1, t1, hb2, t2, hb3) = _widths(variant)
        self.block_extractor1 = nn.Sequential(hybrid_block(t1, g2), Transition(hb2, t2), hybrid_block(t2, g3),
                                              nn.BatchNorm2d(hb3), nn.ReLU(inplace=True))
        self.block_extractor2 = nn.Sequential(hybrid_block(t2, g3), nn.BatchNorm2d(hb3), nn.ReLU(inplace=True))
        self.fc1 = nn.Linear(hb3, num_classes)
        self.fc2 = nn.Linear(hb3, num_classes)

    def forward(self, stages):
        pooled = [F.adaptive_avg_pool2d(self.block_extractor1(stages[0]), 1).flatten(1),
                  F.adaptive_avg_pool2d(self.block_extractor2(stages[1]), 1).flatten(1)]
        return pooled, [self.fc1(pooled[0]), self.fc2(pooled[1])]


class HCGNetAuxiliary(nn.Module):
    def __init__(self, variant="A1", num_classes=100):
        super().__init__()
        self.backbone = HCGNetCIFAR(variant, num_classes, nested=False)
        self.auxiliary_classifier = HCGNetAuxiliaryBranches(variant, num_classes)

    def forward(self, x):
        stages, pooled, logits = self.backbone(x, return_stages=True)
        aux_pooled, aux_logits = self.auxiliary_classifier(stages)
        return aux_pooled + [pooled], aux_logits + [logits]
