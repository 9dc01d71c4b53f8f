"""HCGNet-A1 / A2 for CIFAR (hybrid connectivity with gated SMG modules), alone and with two auxiliary branches.
PyTorch default initialisation everywhere, as the authors' code. Module names, their nesting and the order in which
they are built follow the authors' models/lmcl_hcgnet_cifar.py and hcgnet_cifar.py (state-dict keys as theirs; the
seeded default init draws its weights in their order).

Backbone: conv3x3(3 -> 2*g1) -> HybridBlock1 -> Transition1 (= stage-1 map) -> HybridBlock2 -> Transition2 (= stage-2
map) -> HybridBlock3 -> BN -> ReLU -> pool -> Linear.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

GROWTH = {"A1": (12, 24, 36), "A2": (24, 36, 64)}
MODULES_PER_BLOCK = 8
BOTTLENECK = 4


class BasicConv(nn.Module):
    """Pre-activation conv: BN(in) -> ReLU -> Conv (no bias)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)

    def forward(self, x):
        return self.conv(self.relu(self.norm(x)))


def context_pool(x, context_conv):
    """Attention pooling: softmax over the H*W positions of a 1-channel map, then the weighted sum of x -> (B, C, 1, 1)
    (as the authors: the average pool of the weighted map times H*W)."""
    b, _, h, w = x.shape
    weights = F.softmax(context_conv(x).flatten(1), dim=1).view(b, 1, h, w)
    return F.adaptive_avg_pool2d(x * weights, 1) * (h * w)


class GatedUnit(nn.Module):
    """What SMG modules and transitions share: two convs, then the gating of their output x (C channels) with
    reductions r_a (attention) and r_f (forget gate):
      forget gate  s = sigmoid(fc2 tanh(BN(fc1 pool_f(x))))                      (hidden C/r_f)
      mixture      v3, v5 = pool_3(dw3x3(x)), pool_5(dw3x3 dilation 2 (x));
                   a = tanh(BN(fcall [v3; v5]));  (w3, w5) = softmax over the branches of (fc3x3 a, fc5x5 a)
      out          x * s + w3 v3 + w5 v5                                          (hidden 2C/r_a)
    The 1x1 'fc' layers are 1x1 convolutions on (B, C, 1, 1) maps and the BNs BatchNorm1d on their flattened
    outputs, as the authors'."""

    def _build_gating(self, channels, attention_reduction, forget_reduction):
        # attribute order = the authors' construction order (conv_3x3 ... fc2)
        attention_hidden, forget_hidden = 2 * channels // attention_reduction, channels // forget_reduction
        self.conv_3x3 = BasicConv(channels, channels, 3, padding=1, groups=channels)
        self.conv_5x5 = BasicConv(channels, channels, 3, padding=2, dilation=2, groups=channels)
        self.global_context3x3 = nn.Conv2d(channels, 1, 1)
        self.global_context5x5 = nn.Conv2d(channels, 1, 1)
        self.fcall = nn.Conv2d(2 * channels, attention_hidden, 1)
        self.bn_attention = nn.BatchNorm1d(attention_hidden)
        self.fc3x3 = nn.Conv2d(attention_hidden, channels, 1)
        self.fc5x5 = nn.Conv2d(attention_hidden, channels, 1)
        self.global_forget_context = nn.Conv2d(channels, 1, 1)
        self.bn_forget = nn.BatchNorm1d(forget_hidden)
        self.fc1 = nn.Conv2d(channels, forget_hidden, 1)
        self.fc2 = nn.Conv2d(forget_hidden, channels, 1)

    def gate(self, x):
        b, c = x.shape[:2]
        hidden = self.fc1(context_pool(x, self.global_forget_context))
        forget = torch.sigmoid(self.fc2(torch.tanh(self.bn_forget(hidden.flatten(1))).view(b, -1, 1, 1)))
        v3 = context_pool(self.conv_3x3(x), self.global_context3x3)
        v5 = context_pool(self.conv_5x5(x), self.global_context5x5)
        attention = torch.tanh(self.bn_attention(self.fcall(torch.cat([v3, v5], 1)).flatten(1))).view(b, -1, 1, 1)
        mixture = F.softmax(torch.stack([self.fc3x3(attention).flatten(1), self.fc5x5(attention).flatten(1)], 1), 1)
        w3, w5 = mixture[:, 0].view(b, c, 1, 1), mixture[:, 1].view(b, c, 1, 1)
        return x * forget + (w3 * v3 + w5 * v5)


class SMG(GatedUnit):
    """One densely connected module: BasicConv1x1 (-> 4g) -> grouped BasicConv3x3 (-> g) -> gating (reductions 2);
    returns concat[input, gated g new channels]."""

    def __init__(self, in_channels, growth):
        super().__init__()
        self.conv1_1x1 = BasicConv(in_channels, BOTTLENECK * growth, 1)
        self.conv2_3x3 = BasicConv(BOTTLENECK * growth, growth, 3, padding=1, groups=4)
        self._build_gating(growth, attention_reduction=2, forget_reduction=2)

    def forward(self, x):
        return torch.cat([x, self.gate(self.conv2_3x3(self.conv1_1x1(x)))], 1)


class Transition(GatedUnit):
    """Halves the width and the resolution: BasicConv1x1 -> BasicConv3x3/2 -> gating (reductions 4)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = in_channels - (in_channels - out_channels) // 2
        self.conv1_1x1 = BasicConv(in_channels, mid, 1)
        self.conv2_3x3 = BasicConv(mid, out_channels, 3, stride=2, padding=1)
        self._build_gating(out_channels, attention_reduction=4, forget_reduction=4)

    def forward(self, x):
        return self.gate(self.conv2_3x3(self.conv1_1x1(x)))


class HybridBlock(nn.Sequential):
    """MODULES_PER_BLOCK densely connected SMG modules named SMG1, SMG2, ..."""

    def __init__(self, in_channels, growth):
        super().__init__()
        for i in range(MODULES_PER_BLOCK):
            self.add_module(f"SMG{i + 1}", SMG(in_channels + i * growth, growth))


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
    baseline; inside a pair they are top-level attributes (`features.conv0` stays nested), as in their pair code.
    Built in the authors' order: conv0, HybridBlock1, Transition1, ..., norm5, classifier."""

    def __init__(self, variant="A1", num_classes=100, nested=True):
        super().__init__()
        (g1, g2, g3), (c0, hb1, t1, hb2, t2, hb3) = _widths(variant)
        self.nested = nested
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, c0, 3, 1, 1, bias=False))
        parent = self.features if nested else self
        parent.add_module("HybridBlock1", HybridBlock(c0, g1))
        parent.add_module("Transition1", Transition(hb1, t1))
        parent.add_module("HybridBlock2", HybridBlock(t1, g2))
        parent.add_module("Transition2", Transition(hb2, t2))
        parent.add_module("HybridBlock3", HybridBlock(t2, g3))
        parent.add_module("norm5", nn.BatchNorm2d(hb3))
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
        # the authors build branch 1's two blocks, then branch 1's and branch 2's last blocks (BNs draw nothing)
        self.block_extractor1 = nn.Sequential(HybridBlock(t1, g2), Transition(hb2, t2), HybridBlock(t2, g3),
                                              nn.BatchNorm2d(hb3), nn.ReLU())
        self.block_extractor2 = nn.Sequential(HybridBlock(t2, g3), nn.BatchNorm2d(hb3), nn.ReLU())
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
