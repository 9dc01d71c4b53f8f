"""The weight initialisation shared by every FFSD backbone and by the fusion modules."""
import math

import torch.nn as nn


def reset_parameters(module):
    """Conv weights ~ N(0, sqrt(2 / (k_h * k_w * out_channels))), BN weight 1 / bias 0; Linear and conv biases keep
    PyTorch's default init. Applied after construction, so the default init has already drawn from the RNG."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


def reset_parameters_kaiming(module):
    """The ImageNet ResNets' init: kaiming_normal_(fan_out, relu) for conv weights (reset_parameters' distribution,
    with the std computed as torch.nn.init does, as released), BN weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
