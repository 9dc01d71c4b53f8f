"""What every FFSD backbone shares: the forward that also returns the hooked feature maps and, for the leader, the
TransFusion output."""
import torch.nn as nn

from ffsd.models.fusion import TransFusionModule
from ffsd.models.init import reset_parameters


class Backbone(nn.Module):
    """Subclasses build their layers and define features(x) (the hooked maps, shallow to deep; the last one is the
    map the classifier pools) and classify(last_map). With leader=True a TransFusionModule is added on the last map
    (it is built before the weight init, as released, so it gets the same conv init).

    forward(x) returns (logits, maps) for a common student and (logits, maps, trans_fusion_output) for the leader.
    INIT is the weight initialisation the released model file applies after construction.
    """

    last_channels = None  # C of the last map
    last_spatial = None  # its height/width for the dataset's input size

    def finish_init(self, leader, model_num, init=reset_parameters):
        self.leader = leader
        if leader:
            self.trans_fusion_module = TransFusionModule(self.last_channels, self.last_spatial, model_num)
        init(self)

    def forward(self, x):
        maps = self.features(x)
        if self.leader:
            # TransFusion before the classifier, as released: autograd then sums the gradients reaching the last map
            # in the released order, so a float32 step equals the authors' bit for bit (the math is the same)
            trans_fusion = self.trans_fusion_module(maps[-1])
            return self.classify(maps[-1]), maps, trans_fusion
        return self.classify(maps[-1]), maps
