"""The FusionModule (fed the concatenated student maps) and the leader's TransFusionModule head."""
import torch.nn as nn
import torch.nn.functional as F

from ffsd.models.init import reset_parameters


class FusionModule(nn.Module):
    """Depthwise 3x3 + BN + ReLU on the C*M concatenated maps, 1x1 down to C + BN + ReLU (the fused map H), then
    global average pooling and a linear classifier. forward returns (logits z_F, fused map H)."""

    def __init__(self, channel, num_classes, spatial, model_num=2):
        super().__init__()
        self.spatial = spatial
        self.conv1 = nn.Conv2d(channel * model_num, channel * model_num, 3, padding=1, groups=channel * model_num,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(channel * model_num)
        self.conv1_1 = nn.Conv2d(channel * model_num, channel, 1, bias=False)
        self.bn1_1 = nn.BatchNorm2d(channel)
        self.fc2 = nn.Linear(channel, num_classes)
        reset_parameters(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)  # on BN outputs, which BN does not keep for backward
        fused = F.relu(self.bn1_1(self.conv1_1(x)), inplace=True)
        logits = self.fc2(F.avg_pool2d(fused, self.spatial).flatten(1))
        return logits, fused


class TransFusionModule(nn.Module):
    """Inside the leader: depthwise 3x3 + BN + ReLU, then 1x1 from C to C*M + BN + ReLU, applied to the leader's last
    map. Trained so that its attention matches that of the concatenated student maps."""

    def __init__(self, channel, spatial, model_num=2):
        super().__init__()
        self.spatial = spatial  # stored by the authors, unused
        self.conv1 = nn.Conv2d(channel, channel, 3, padding=1, groups=channel, bias=False)
        self.bn1 = nn.BatchNorm2d(channel)
        self.conv1_1 = nn.Conv2d(channel, channel * model_num, 1, bias=False)
        self.bn1_1 = nn.BatchNorm2d(channel * model_num)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)  # on BN outputs: X, the leader's last map, is untouched
        return F.relu(self.bn1_1(self.conv1_1(x)), inplace=True)
