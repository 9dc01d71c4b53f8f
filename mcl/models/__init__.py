"""Networks of L-MCL: CIFAR ResNet / WRN / ShuffleNetV2 / HCGNet and ImageNet ResNet / ShuffleNetV2, each alone
(the deployed baseline) and with its auxiliary branches; pairs; the loss-side modules."""
from mcl.models.heads import Aggregator, EmbedHeads, LossWeightNetwork
from mcl.models.pairs import (CIFAR_BASELINES, CIFAR_HETEROGENEOUS, CIFAR_HOMOGENEOUS, CIFAR_PAIRS, IMAGENET_BASELINES,
                              IMAGENET_HETEROGENEOUS, IMAGENET_HOMOGENEOUS, IMAGENET_PAIRS, CrossNets, HomogeneousPair,
                              build_cifar_baseline, build_cifar_pair, build_imagenet_baseline, build_imagenet_pair,
                              networks_of)
