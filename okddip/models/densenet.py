"""DenseNet-BC for CIFAR as in the released code ("densenetd40k12" = DenseNet-BC-40-12, 0.176 M parameters).

Dense layer BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); transitions BN-ReLU-conv1x1(x0.5)-avgpool2; 3x3 stem with 2k
channels; final BN-ReLU-8x8 average pool-Linear.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> (growth rate, layers per block)
CONFIGS = {"densenetd40k12": (12, 6), "densenetd100k12": (12, 16), "densenetd100k40": (40, 16),
           "densenetd190k12": (12, 31)}


class DenseLayer(nn.Module):
    def __init__(self, in_ch, growth):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return torch.cat([x, out], 1)


def dense_block(in_ch, growth, n):
    return nn.Sequential(*[DenseLayer(in_ch + i * growth, growth) for i in range(n)]), in_ch + n * growth


def transition(in_ch):
    out = in_ch // 2
    return nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.Conv2d(in_ch, out, 1, bias=False),
                         nn.AvgPool2d(2)), out


def build_dense_trunk(owner, arch):
    """Registers conv0, block1, trans1, block2, trans2 on OWNER; returns (channels out, growth, layers per block)."""
    growth, n = CONFIGS[arch]
    owner.conv0 = nn.Conv2d(3, 2 * growth, 3, padding=1, bias=False)
    owner.block1, ch = dense_block(2 * growth, growth, n)
    owner.trans1, ch = transition(ch)
    owner.block2, ch = dense_block(ch, growth, n)
    owner.trans2, ch = transition(ch)
    return ch, growth, n


def run_dense_trunk(owner, x):
    return owner.trans2(owner.block2(owner.trans1(owner.block1(owner.conv0(x)))))


def init_densenet(module):
    """Conv kaiming_normal (fan_in), BN 1/0, Linear bias 0 (weight keeps the default init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.constant_(m.bias, 0)


class DenseNet(nn.Module):
    def __init__(self, arch, num_classes=10, KD=False):
        super().__init__()
        self.KD = KD
        ch, growth, n = build_dense_trunk(self, arch)
        self.block3, ch = dense_block(ch, growth, n)
        self.norm_final = nn.BatchNorm2d(ch)
        self.classifier = nn.Linear(ch, num_classes)
        self.feature_dim = ch
        init_densenet(self)

    def forward(self, x):
        x = F.relu(self.norm_final(self.block3(run_dense_trunk(self, x))))
        h = F.adaptive_avg_pool2d(x, 1).flatten(1)  # the 8x8 average pool of the released code
        logits = self.classifier(h)
        return (h, logits) if self.KD else logits
