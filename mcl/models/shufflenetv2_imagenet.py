"""ShuffleNetV2 1x for ImageNet (stride-2 3x3 stem + 3x3/2 max-pool, stages of 4/8/4 units), alone and with three
auxiliary branches. PyTorch default initialisation everywhere, as the CIFAR version.

Branch 1 reads the max-pooled stem (24 channels) and runs one-unit copies of all three stages; branch 2 reads the
stage-1 output and runs full copies of stages 2 and 3; branch 3 reads the stage-2 output and runs a full copy of
stage 3. Every branch ends with the 1x1 conv to 1024, BN, ReLU, pool and its classifier.
"""
import torch.nn as nn
import torch.nn.functional as F

from mcl.models.shufflenetv2_cifar import make_stage

CHANNELS = (24, 116, 232, 464, 1024)  # stem, stage 1..3, last conv (1x width)
BLOCKS = (3, 7, 3)  # stride-1 units after each stage's down-sampling unit


def _last_conv(c_in, c_last):
    return [nn.Conv2d(c_in, c_last, 1, bias=False), nn.BatchNorm2d(c_last), nn.ReLU(inplace=True)]


class ShuffleNetV2ImageNet(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        c0, c1, c2, c3, c_last = CHANNELS
        self.conv1 = nn.Conv2d(3, c0, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.layer1 = make_stage(c0, c1, BLOCKS[0])
        self.layer2 = make_stage(c1, c2, BLOCKS[1])
        self.layer3 = make_stage(c2, c3, BLOCKS[2])
        self.conv2 = nn.Conv2d(c3, c_last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_last)
        self.linear = nn.Linear(c_last, num_classes)
        self.feature_dim = c_last

    def forward(self, x, return_stages=False):
        f1 = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        f2 = self.layer1(f1)
        f3 = self.layer2(f2)
        out = F.relu(self.bn2(self.conv2(self.layer3(f3))))
        pooled = F.adaptive_avg_pool2d(out, 1).flatten(1)
        logits = self.linear(pooled)
        if return_stages:
            return [f1, f2, f3], pooled, logits
        return pooled, logits


class ShuffleNetV2ImageNetAuxiliaryBranches(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        c0, c1, c2, c3, c_last = CHANNELS
        self.block_extractor1 = nn.Sequential(make_stage(c0, c1, 1), make_stage(c1, c2, 1), make_stage(c2, c3, 1),
                                              *_last_conv(c3, c_last))
        self.block_extractor2 = nn.Sequential(make_stage(c1, c2, BLOCKS[1]), make_stage(c2, c3, BLOCKS[2]),
                                              *_last_conv(c3, c_last))
        self.block_extractor3 = nn.Sequential(make_stage(c2, c3, BLOCKS[2]), *_last_conv(c3, c_last))
        self.fc1 = nn.Linear(c_last, num_classes)
        self.fc2 = nn.Linear(c_last, num_classes)
        self.fc3 = nn.Linear(c_last, num_classes)

    def forward(self, stages):
        extractors = (self.block_extractor1, self.block_extractor2, self.block_extractor3)
        pooled = [F.adaptive_avg_pool2d(ex(f), 1).flatten(1) for ex, f in zip(extractors, stages)]
        return pooled, [fc(h) for fc, h in zip((self.fc1, self.fc2, self.fc3), pooled)]


class ShuffleNetV2ImageNetAuxiliary(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.backbone = ShuffleNetV2ImageNet(num_classes)
        self.auxiliary_classifier = ShuffleNetV2ImageNetAuxiliaryBranches(num_classes)

    def forward(self, x):
        stages, pooled, logits = self.backbone(x, return_stages=True)
        aux_pooled, aux_logits = self.auxiliary_classifier(stages)
        return aux_pooled + [pooled], aux_logits + [logits]
