"""ResNets of the released code: CIFAR resnet32 / resnet110 (Bottleneck) / wide_resnet20_8 and ImageNet resnet34.

torchvision-style blocks with projection shortcuts (conv1x1 + BN, "option B"). Module creation order matters for
seed-exact weights: a stage creates its downsample conv before the first block's convs, and the init loop (conv
kaiming_normal fan_out, BN 1/0) runs over the modules in registration order after everything exists.
"""
import torch.nn as nn


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=64):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)  # after the main path, as released
        out += identity  # in place into the BN output (autograd does not keep it), never into the block's input
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=64):
        super().__init__()
        width = int(planes * base_width / 64)  # base_width 512 makes the 8x-wide "wide_resnet20_8"
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)  # after the main path, as released
        out += identity  # in place, as in BasicBlock
        return self.relu(out)


# name -> (block, blocks per stage, base_width, imagenet?)
CONFIGS = {
    "resnet32": (BasicBlock, [5, 5, 5], 64, False),
    "resnet110": (Bottleneck, [12, 12, 12], 64, False),  # the released code's "resnet110" is a Bottleneck-110
    "wide_resnet20_8": (Bottleneck, [2, 2, 2], 512, False),
    "resnet34": (BasicBlock, [3, 4, 6, 3], 64, True),
}


def make_stage(block, inplanes, planes, blocks, stride, base_width):
    """One stage; returns (nn.Sequential, output channels). The downsample is created first, as in torchvision."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, kernel_size=1, stride=stride,
                                             bias=False), nn.BatchNorm2d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample, base_width)]
    inplanes = planes * block.expansion
    layers += [block(inplanes, planes, base_width=base_width) for _ in range(1, blocks)]
    return nn.Sequential(*layers), inplanes


def stage_planes(imagenet):
    return [64, 128, 256, 512] if imagenet else [16, 32, 64]


def build_stem(owner, imagenet):
    """Registers conv1/bn1 (+relu, maxpool for ImageNet) on OWNER; returns the stem's output channels."""
    if imagenet:
        owner.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        owner.bn1 = nn.BatchNorm2d(64)
        owner.relu = nn.ReLU(inplace=True)
        owner.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        return 64
    owner.conv1 = conv3x3(3, 16)
    owner.bn1 = nn.BatchNorm2d(16)
    owner.relu = nn.ReLU(inplace=True)
    return 16


def run_stem(owner, x):
    x = owner.relu(owner.bn1(owner.conv1(x)))
    return owner.maxpool(x) if hasattr(owner, "maxpool") else x


def init_resnet(module):
    """The released init loop: conv kaiming_normal (fan_out, relu), BatchNorm2d weight 1 / bias 0; Linear untouched."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class ResNet(nn.Module):
    """Plain (deployable) ResNet. With KD=True forward returns (GAP features, logits)."""

    def __init__(self, arch, num_classes=10, KD=False):
        super().__init__()
        block, layers, base_width, imagenet = CONFIGS[arch]
        self.KD = KD
        inplanes = build_stem(self, imagenet)
        self.num_stages = len(layers)
        for i, (planes, blocks) in enumerate(zip(stage_planes(imagenet), layers)):
            stage, inplanes = make_stage(block, inplanes, planes, blocks, 1 if i == 0 else 2, base_width)
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self.feature_dim = inplanes
        init_resnet(self)

    def forward(self, x):
        x = run_stem(self, x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        h = self.avgpool(x).flatten(1)
        logits = self.fc(h)
        return (h, logits) if self.KD else logits
