"""Networks of the released OKDDip code: plain CIFAR/ImageNet networks and the multi-student models."""
from okddip.models.branches import (ALL_ARCHS, CIFAR_ARCHS, IMAGENET_ARCHS, IndependentNets, OKDDipBranches,
                                    ONEBranches, check_arch, plain_network)

__all__ = ["ALL_ARCHS", "CIFAR_ARCHS", "IMAGENET_ARCHS", "IndependentNets", "OKDDipBranches", "ONEBranches",
           "check_arch", "plain_network"]
