"""ImageNet ResNet-18/34/50 (torchvision layout: 7x7 stem, max-pool, 4 stages, v1.5 Bottleneck), alone and with
three auxiliary branches.

Auxiliary branch m (m = 1, 2, 3) reads the layer-m output and runs fresh copies of the later stages m+1..4 with ONE
block each, then pools and classifies. Heads are returned as [branch1, branch2, branch3, backbone]; every head is as
wide as the backbone's final feature (512 for ResNet-18/34, 2048 for ResNet-50).
"""
import torch.nn as nn
import torch.nn.functional as F

from mcl.models.resnet_cifar import BasicBlock, Bottleneck, init_kaiming, make_layer

DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}
WIDTHS = (64, 128, 256, 512)


def _block_config(depth):
    if depth not in DEPTHS:
        raise ValueError(f"ImageNet ResNet depth {depth} unknown; valid depths: {sorted(DEPTHS)}")
    return DEPTHS[depth]


class ResNetImageNet(nn.Module):
    """The deployed network (baseline and backbone of a pair have the same keys). forward(x, return_stages=True)
    also returns the layer1..layer3 maps the auxiliary branches read."""

    def __init__(self, depth, num_classes=1000):
        super().__init__()
        block, blocks = _block_config(depth)
        e = block.expansion
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = make_layer(block, 64, 64, blocks[0], 1)
        self.layer2 = make_layer(block, 64 * e, 128, blocks[1], 2)
        self.layer3 = make_layer(block, 128 * e, 256, blocks[2], 2)
        self.layer4 = make_layer(block, 256 * e, 512, blocks[3], 2)
        self.feature_dim = 512 * e
        self.fc = nn.Linear(self.feature_dim, num_classes)
        init_kaiming(self)  # no zero-init of the last BN of a block (the authors' zero_init_residual=False)

    def forward(self, x, return_stages=False):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        pooled = F.adaptive_avg_pool2d(self.layer4(f3), 1).flatten(1)
        logits = self.fc(pooled)
        if return_stages:
            return [f1, f2, f3], pooled, logits
        return pooled, logits


class ResNetImageNetAuxiliaryBranches(nn.Module):
    def __init__(self, depth, num_classes=1000):
        super().__init__()
        block, _ = _block_config(depth)
        e = block.expansion

        def later_stages(first):  # fresh one-block copies of stages first..4 (1-based)
            return nn.Sequential(*[make_layer(block, WIDTHS[s - 1] * e, WIDTHS[s], 1, 2) for s in range(first, 4)])

        self.block_extractor1 = later_stages(1)
        self.block_extractor2 = later_stages(2)
        self.block_extractor3 = later_stages(3)
        self.fc1 = nn.Linear(512 * e, num_classes)
        self.fc2 = nn.Linear(512 * e, num_classes)
        self.fc3 = nn.Linear(512 * e, num_classes)
        init_kaiming(self)  # as the backbone: the classifiers keep PyTorch's default init, biases included

    def forward(self, stages):
        extractors = (self.block_extractor1, self.block_extractor2, self.block_extractor3)
        pooled = [F.adaptive_avg_pool2d(ex(f), 1).flatten(1) for ex, f in zip(extractors, stages)]
        return pooled, [fc(h) for fc, h in zip((self.fc1, self.fc2, self.fc3), pooled)]


class ResNetImageNetAuxiliary(nn.Module):
    """backbone + auxiliary_classifier; forward -> (pooled features, logits), each [b1, b2, b3, backbone]."""

    def __init__(self, depth, num_classes=1000):
        super().__init__()
        self.backbone = ResNetImageNet(depth, num_classes)
        self.auxiliary_classifier = ResNetImageNetAuxiliaryBranches(depth, num_classes)

    def forward(self, x):
        stages, pooled, logits = self.backbone(x, return_stages=True)
        aux_pooled, aux_logits = self.auxiliary_classifier(stages)
        return aux_pooled + [pooled], aux_logits + [logits]
