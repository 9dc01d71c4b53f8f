"""Self-distillation decoders: transposed-conv stages that rebuild the shallower feature maps from the last one."""
import torch.nn as nn
import torch.nn.functional as F


class SelfDistillationModule(nn.Module):
    """One stage: ConvTranspose2d(k3, stride 2) doubling H and W, BN, ReLU. (`convtranpose` is the authors' key.)"""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.convtranpose = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1,
                                               bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return F.relu(self.norm(self.convtranpose(x)), inplace=True)  # on the BN output (BN keeps its input)


class SelfDistillationModel(nn.Module):
    """Stages layer0, layer1, ... through CHANNELS (deepest first). PyTorch default init, as released.

    forward returns the stage outputs in stage order (deepest-resolution first); callers reverse them to align with
    the backbone's shallow-to-deep feature maps."""

    def __init__(self, channels):
        super().__init__()
        self.channels = list(channels)
        for k, (c_in, c_out) in enumerate(zip(self.channels[:-1], self.channels[1:])):
            self.add_module(f"layer{k}", SelfDistillationModule(c_in, c_out))
        self.num_stages = len(self.channels) - 1

    def forward(self, x):
        outputs = []
        for k in range(self.num_stages):
            x = getattr(self, f"layer{k}")(x)
            outputs.append(x)
        return outputs


def halving_channels(last_channels, num_stages):
    """The default decoder: each stage halves the channel count (integer halving)."""
    channels = [last_channels]
    for _ in range(num_stages):
        channels.append(channels[-1] // 2)
    return channels
