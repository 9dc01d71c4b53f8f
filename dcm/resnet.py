"""Wide ResNet with DCM's two auxiliary classifiers (the authors' `resnet.py`, as nn.Modules).

The released code is a functional WRN (a flat parameter dict plus a pure function). This module reproduces it
exactly, with module names chosen so that `state_dict()` maps 1:1 onto the flat dict (see `dcm.convert`):

    conv0                      stem 3x3 conv, 16 channels whatever the width
    group{0,1,2}.block{i}      pre-activation basic blocks, widths int(16k), int(32k), int(64k)
    bn, fc                     final BN-ReLU-avgpool-linear head
    ep1_group1, ep1_group2     aux 1, fed from group0: a full copy of stage 2 and half of stage 3
    ep1_bn, ep1_fc
    ep2_group2, ep2_bn, ep2_fc aux 2, fed from group1: a double-width copy of stage 3

forward() returns (aux1_logits, aux2_logits, final_logits); with aux=False (the deployed model, and the DML and
baseline networks) only the final logits, still as a 1-tuple so callers treat both alike.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def wrn_hyper(depth, width):
    """(blocks per group, (w0, w1, w2)); raises ValueError for a depth the architecture cannot take."""
    if (depth - 4) % 6 != 0:
        raise ValueError(f"WRN depth must satisfy (depth - 4) % 6 == 0 (e.g. 16, 22, 28, 40); got {depth}")
    if depth < 16:
        raise ValueError(f"WRN depth must be at least 16 with DCM's aux heads: aux 1 holds (depth - 4) // 12 "
                         f"stage-3 blocks, which is 0 for depth {depth}; got {depth}")
    widths = (int(16 * width), int(32 * width), int(64 * width))
    if min(widths) < 1:
        raise ValueError(f"WRN width {width} gives a stage with {min(widths)} channels; use width >= 1/16")
    return (depth - 4) // 6, widths


class Block(nn.Module):
    """Pre-activation basic block. The projection shortcut reads the pre-activated input relu(bn0(x)), as released."""

    def __init__(self, ni, no, stride):
        super().__init__()
        # Registration order = the flat dict's key order = the order the init draws from the RNG.
        self.conv0 = nn.Conv2d(ni, no, 3, stride, 1, bias=False)
        self.conv1 = nn.Conv2d(no, no, 3, 1, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(ni)
        self.bn1 = nn.BatchNorm2d(no)
        self.convdim = nn.Conv2d(ni, no, 1, stride, 0, bias=False) if ni != no else None

    def forward(self, x):
        # In place only on fresh tensors no backward reads: a BN output (BN's backward reads its input) and a conv
        # output (the sum's backward reads neither side). X, the block's input, is never written: the caller, the
        # shortcut and bn0's backward still need it. The values are those of the out-of-place forward, bit for bit.
        o1 = F.relu(self.bn0(x), inplace=True)
        y = self.conv0(o1)
        o2 = F.relu(self.bn1(y), inplace=True)
        z = self.conv1(o2)
        return z.add_(self.convdim(o1) if self.convdim is not None else x)


def pool_head(normalised):
    """ReLU (in place on the BN output it is given), 8x8 average pool, flatten: the released head before its fc."""
    return F.avg_pool2d(F.relu(normalised, inplace=True), 8, 1).flatten(1)


class Group(nn.ModuleDict):
    """n blocks named block0..block{n-1}; only block0 carries the stride."""

    def __init__(self, ni, no, n, stride):
        super().__init__({f"block{i}": Block(ni if i == 0 else no, no, stride if i == 0 else 1) for i in range(n)})

    def forward(self, x):
        for block in self.values():
            x = block(x)
        return x


class WRN(nn.Module):
    def __init__(self, depth=28, width=10, num_classes=100, aux=True):
        super().__init__()
        n, (w0, w1, w2) = wrn_hyper(depth, width)
        self.depth, self.width, self.num_classes, self.aux = depth, width, num_classes, aux
        self.conv0 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.group0 = Group(16, w0, n, 1)
        self.group1 = Group(w0, w1, n, 2)
        self.group2 = Group(w1, w2, n, 2)
        self.bn = nn.BatchNorm2d(w2)
        self.fc = nn.Linear(w2, num_classes)
        if aux:
            self.ep1_group1 = Group(w0, w1, n, 2)
            self.ep1_group2 = Group(w1, w2, n // 2, 2)
            self.ep1_bn = nn.BatchNorm2d(w2)
            self.ep1_fc = nn.Linear(w2, num_classes)
            self.ep2_group2 = Group(w1, 2 * w2, n, 2)
            self.ep2_bn = nn.BatchNorm2d(2 * w2)
            self.ep2_fc = nn.Linear(2 * w2, num_classes)

    def head_names(self):
        return ("aux1", "aux2", "final") if self.aux else ("final",)

    def forward(self, x):
        g0 = self.group0(self.conv0(x))
        g1 = self.group1(g0)
        g2 = self.group2(g1)
        final = self.fc(pool_head(self.bn(g2)))
        if not self.aux:
            return (final,)
        e1 = self.ep1_group2(self.ep1_group1(g0))
        aux1 = self.ep1_fc(pool_head(self.ep1_bn(e1)))
        e2 = self.ep2_group2(g1)
        aux2 = self.ep2_fc(pool_head(self.ep2_bn(e2)))
        return aux1, aux2, final

    @torch.no_grad()
    def reset_parameters_as_released(self):
        """The released init, drawing from the CPU RNG in the released key order.

        conv and fc weights: kaiming-normal (fan_in, gain sqrt 2); fc bias 0; BN gamma ~ U[0, 1), beta 0, running
        stats 0/1. Call on CPU right after torch.manual_seed(seed): the CUDA RNG gives other numbers.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0, 1)
                m.bias.zero_()
                m.reset_running_stats()
        return self

    def deployed_parameters(self):
        """Parameters of the deployed model (no auxiliary classifiers)."""
        return [p for name, p in self.named_parameters() if not name.startswith(("ep1_", "ep2_"))]
