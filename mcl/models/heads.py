"""Loss-side modules of L-MCL (trained, never deployed): embed heads, the aggregator and the loss-weight network.
Attribute names follow the authors' state_dict keys (criterion `embed_list`, aggregator `proj_head_<net>`,
weight network `proj`)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Embed(nn.Module):
    """d -> 128 -> ReLU -> 128, rows divided by their L2 norm (no epsilon, as the authors)."""

    def __init__(self, dim_in, dim_out=128):
        super().__init__()
        self.proj_head = nn.Sequential(nn.Linear(dim_in, dim_out), nn.ReLU(inplace=True), nn.Linear(dim_out, dim_out))

    def forward(self, x):
        x = self.proj_head(x)
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


class EmbedHeads(nn.Module):
    """One embed head per network and head (`embed_list.<net>.<head>`); all heads of network i read rep_dim[i]."""

    def __init__(self, rep_dim, number_stage, feat_dim=128):
        super().__init__()
        self.embed_list = nn.ModuleList([nn.ModuleList([Embed(d, feat_dim) for _ in range(number_stage)])
                                         for d in rep_dim])

    def forward(self, features):
        return [[embed(h) for embed, h in zip(heads, feats)] for heads, feats in zip(self.embed_list, features)]


class Aggregator(nn.Module):
    """Per network: softmax(MLP([h_0; h_1; h_2])) gives per-sample head weights; returns the weighted sum of the
    heads' logits and the weights."""

    def __init__(self, rep_dim, number_stage):
        super().__init__()
        self.number_net = len(rep_dim)
        for i, d in enumerate(rep_dim):
            setattr(self, f"proj_head_{i}", nn.Sequential(nn.Linear(number_stage * d, d), nn.ReLU(inplace=True),
                                                          nn.Linear(d, number_stage)))

    def forward(self, features, logits):
        aggregated, stage_weights = [], []
        for i in range(self.number_net):
            weights = F.softmax(getattr(self, f"proj_head_{i}")(torch.cat(features[i], 1)), dim=1)
            aggregated.append(sum(weights[:, j:j + 1] * z for j, z in enumerate(logits[i])))
            stage_weights.append(weights)
        return aggregated, stage_weights


class LossWeightNetwork(nn.Module):
    """The meta-network: one Linear(d_ij -> 128) per network i and head j. For every ordered network pair (i, j),
    i != j, head k of i and head z of j (k outer, z inner): w = sigmoid(cos(P_ik h_ik, P_jz h_jz)), one per sample."""

    def __init__(self, feat_dims, dim_out=128):
        super().__init__()
        self.proj = nn.ModuleList([nn.ModuleList([nn.Linear(d, dim_out) for d in dims]) for dims in feat_dims])

    def forward(self, features):
        projected = [[p(h) for p, h in zip(ps, hs)] for ps, hs in zip(self.proj, features)]
        weights = []
        for i in range(len(features)):
            for j in range(len(features)):
                if i == j:
                    continue
                for k in range(len(features[i])):
                    for z in range(len(features[j])):
                        weights.append(torch.sigmoid(F.cosine_similarity(projected[i][k], projected[j][z], dim=1)))
        return weights
