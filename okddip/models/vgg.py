"""CIFAR VGG-16/19 of the released code: conv-BN-ReLU stages with max-pooling, a 3-layer MLP classifier.

The released module layout and key names: conv1, bn1, conv2, bn2 (64 channels, then max-pool), layer1..layer4 (each
a Sequential of [Conv2d, BatchNorm2d, ReLU] per conv and a final MaxPool2d: keys `layer1.0`, `layer1.1`, `layer1.3`,
...), classifier (Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear). Modules are created in that order, so a
seeded construction draws the RNG as the released one does.
"""
import torch.nn as nn

# convs per stage after the first two 64-channel convs: layer1..layer4
STAGES = {"vgg16": [(128, 2), (256, 3), (512, 3), (512, 3)], "vgg19": [(128, 2), (256, 4), (512, 4), (512, 4)]}


def conv_stage(in_ch, out_ch, n):
    layers = []
    for _ in range(n):
        layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
        in_ch = out_ch
    return nn.Sequential(*layers, nn.MaxPool2d(2, 2))


def mlp_classifier(num_classes, dropout):
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(p=dropout),
                         nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(p=dropout), nn.Linear(512, num_classes))


def build_vgg_trunk(owner, arch, upto):
    """Registers conv1, bn1, conv2, bn2, relu, maxpool and layer1..layer<upto> on OWNER; returns the channels."""
    owner.conv1 = nn.Conv2d(3, 64, 3, padding=1)
    owner.bn1 = nn.BatchNorm2d(64)
    owner.conv2 = nn.Conv2d(64, 64, 3, padding=1)
    owner.bn2 = nn.BatchNorm2d(64)
    owner.relu = nn.ReLU(inplace=True)
    owner.maxpool = nn.MaxPool2d(2, 2)
    in_ch = 64
    for i, (ch, n) in enumerate(STAGES[arch][:upto]):
        setattr(owner, f"layer{i + 1}", conv_stage(in_ch, ch, n))
        in_ch = ch
    return in_ch


def run_vgg_trunk(owner, x, upto):
    x = owner.relu(owner.bn1(owner.conv1(x)))
    x = owner.maxpool(owner.relu(owner.bn2(owner.conv2(x))))
    for i in range(upto):
        x = getattr(owner, f"layer{i + 1}")(x)
    return x


def init_vgg(module, zero_linear_bias=True):
    """Conv kaiming_normal fan_out with bias 0, BN 1/0, Linear N(0, 0.01) (bias 0 unless zero_linear_bias=False,
    which is what the released multi-branch OKDDip VGG does)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if zero_linear_bias and m.bias is not None:
                nn.init.constant_(m.bias, 0)


class VGG(nn.Module):
    """Plain VGG (spatial 32 -> 1). With KD=True forward returns (512-d features, logits)."""

    def __init__(self, arch, num_classes=10, dropout=0.0, KD=False):
        super().__init__()
        self.KD = KD
        build_vgg_trunk(self, arch, 4)
        self.classifier = mlp_classifier(num_classes, dropout)
        self.feature_dim = 512
        init_vgg(self)

    def forward(self, x):
        h = run_vgg_trunk(self, x, 4).flatten(1)
        logits = self.classifier(h)
        return (h, logits) if self.KD else logits
