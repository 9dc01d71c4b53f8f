"""The multi-student models: shared trunk + independent last stage per branch, or independent networks.

* `Trunk`-style helpers per family say what is shared (ResNet: stem..layer2 on CIFAR, stem..layer3 on ImageNet;
  VGG: through layer3; DenseNet: through the second transition) and build one branch (the last stage, its pooling
  and its own classifier).
* `OKDDipBranches` (released resnet_GL / vgg_GL / densenet_GL), `ONEBranches` (resnet_one / vgg_one /
  densenet_one: ONE, CL-ILR, individual branches), `IndependentNets` (DML.MutualNet, and MultiNet.StuNet for
  network-based OKDDip when `attention=True`).

Every forward returns a dict of tensors (B = batch, C = classes):
    pro      (B, C, P)  student logits, one column per peer/branch/network
    x_m      (B, C, P)  OKDDip: attention-aggregated peer logits; CL-ILR: leave-one-out mean; ONE: (B, C) gated
    leader   (B, C)     OKDDip group leader (absent in ensemble mode and for the other methods)
and, where they exist, the attention intermediates (features h, query/key projections, energy, attention) and the
ONE gate intermediates.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from okddip.models import densenet, resnet, vgg


# --------------------------------------------------------------------------------------------------- families ----
class ResNetFamily:
    def __init__(self, arch, num_classes, **_):
        self.block, self.layers, self.base_width, self.imagenet = resnet.CONFIGS[arch]
        self.num_classes = num_classes
        self.last = len(self.layers)  # the last stage is per-branch (layer3 on CIFAR, layer4 on ImageNet)

    def layer_name(self, i):
        return f"layer{self.last}_{i}"

    def classifier_name(self, i):
        return f"classifier{self.last}_{i}"

    def build_trunk(self, owner):
        inplanes = resnet.build_stem(owner, self.imagenet)
        planes = resnet.stage_planes(self.imagenet)
        for i in range(self.last - 1):
            stage, inplanes = resnet.make_stage(self.block, inplanes, planes[i], self.layers[i], 1 if i == 0 else 2,
                                                self.base_width)
            setattr(owner, f"layer{i + 1}", stage)
        self.trunk_channels = inplanes
        self.feature_dim = resnet.stage_planes(self.imagenet)[-1] * self.block.expansion
        return inplanes

    def run_trunk(self, owner, x):
        x = resnet.run_stem(owner, x)
        for i in range(self.last - 1):
            x = getattr(owner, f"layer{i + 1}")(x)
        return x

    def make_branch(self, shared=None):
        layer, out = resnet.make_stage(self.block, self.trunk_channels, resnet.stage_planes(self.imagenet)[-1],
                                       self.layers[-1], 2, self.base_width)
        return layer, nn.Linear(out, self.num_classes)

    @staticmethod
    def features(layer, t):
        return F.adaptive_avg_pool2d(layer(t), 1).flatten(1)

    def init(self, owner):
        resnet.init_resnet(owner)


class VGGFamily:
    def __init__(self, arch, num_classes, branch_dropout=0.5, zero_linear_bias=True, **_):
        self.arch, self.num_classes, self.dropout = arch, num_classes, branch_dropout
        self.zero_linear_bias = zero_linear_bias
        self.feature_dim = 512

    def layer_name(self, i):
        return f"layer4_{i}"

    def classifier_name(self, i):
        return f"classifier_{i}"

    def build_trunk(self, owner):
        self.trunk_channels = vgg.build_vgg_trunk(owner, self.arch, 3)
        return self.trunk_channels

    def run_trunk(self, owner, x):
        return vgg.run_vgg_trunk(owner, x, 3)

    def make_branch(self, shared=None):
        ch, n = vgg.STAGES[self.arch][3]
        return vgg.conv_stage(self.trunk_channels, ch, n), vgg.mlp_classifier(self.num_classes, self.dropout)

    @staticmethod
    def features(layer, t):
        return layer(t).flatten(1)

    def init(self, owner):
        vgg.init_vgg(owner, self.zero_linear_bias)


class DenseHead(nn.Module):
    """A DenseNet branch: the last dense block and its final BN (the block object may be shared, see below)."""

    def __init__(self, block, channels):
        super().__init__()
        self.block = block
        self.norm_final = nn.BatchNorm2d(channels)

    def forward(self, t):
        return F.relu(self.norm_final(self.block(t)))


class DenseNetFamily:
    """shared_block=True reproduces the released densenet_GL/densenet_one: ONE dense-block object serves as the
    last block of every branch (all branches share its weights); only norm_final and the classifier differ."""

    def __init__(self, arch, num_classes, shared_block=True, **_):
        self.arch, self.num_classes, self.shared_block = arch, num_classes, shared_block
        self._block = None

    def layer_name(self, i):
        return f"layer3_{i}"

    def classifier_name(self, i):
        return f"classifier3_{i}"

    def build_trunk(self, owner):
        self.trunk_channels, self.growth, self.n = densenet.build_dense_trunk(owner, self.arch)
        self.feature_dim = self.trunk_channels + self.growth * self.n
        return self.trunk_channels

    def run_trunk(self, owner, x):
        return densenet.run_dense_trunk(owner, x)

    def make_branch(self, shared=None):
        if self._block is None or not self.shared_block:
            self._block, _ = densenet.dense_block(self.trunk_channels, self.growth, self.n)
        return DenseHead(self._block, self.feature_dim), nn.Linear(self.feature_dim, self.num_classes)

    @staticmethod
    def features(layer, t):
        return F.adaptive_avg_pool2d(layer(t), 1).flatten(1)

    def init(self, owner):
        densenet.init_densenet(owner)


CIFAR_ARCHS = ("resnet32", "resnet110", "wide_resnet20_8", "vgg16", "vgg19", "densenetd40k12", "densenetd100k12",
               "densenetd100k40", "densenetd190k12")
IMAGENET_ARCHS = ("resnet34",)
ALL_ARCHS = CIFAR_ARCHS + IMAGENET_ARCHS


def check_arch(arch, dataset=None):
    valid = IMAGENET_ARCHS if dataset == "imagenet" else CIFAR_ARCHS if dataset else ALL_ARCHS
    if arch not in valid:
        raise ValueError(f"unknown architecture {arch!r} for {dataset or 'any dataset'}; valid: {', '.join(valid)}")


def family(arch, num_classes, **options):
    check_arch(arch)
    if arch in resnet.CONFIGS:
        return ResNetFamily(arch, num_classes, **options)
    if arch in vgg.STAGES:
        return VGGFamily(arch, num_classes, **options)
    return DenseNetFamily(arch, num_classes, **options)


def plain_network(arch, num_classes, dropout=0.0, KD=False):
    """The single deployable network (baseline, KD student/teacher, DML member, network-based OKDDip student)."""
    check_arch(arch)
    if arch in resnet.CONFIGS:
        return resnet.ResNet(arch, num_classes, KD=KD)
    if arch in vgg.STAGES:
        return vgg.VGG(arch, num_classes, dropout=dropout, KD=KD)
    return densenet.DenseNet(arch, num_classes, KD=KD)


# -------------------------------------------------------------------------------------------------- attention ----
def float32(t):
    """Autocast off: under --amp bf16 the attention, the gate and the targets built from logits stay in float32
    (a softmax over a few scores and sums of logits; their inputs are cast with .float(), a no-op in float32)."""
    return torch.autocast(t.device.type, enabled=False)


def peer_attention(h, query, key):
    """alpha_ab = softmax_b(q_a . k_b), q = W_L h, k = W_E h; plain dot product, self included (h: B x P x F)."""
    q, k = query(h), key(h)
    energy = torch.bmm(q, k.transpose(1, 2))
    return q, k, energy, F.softmax(energy, dim=-1)


def aggregate(pro, attention):
    """x_m[:, :, a] = sum_b alpha_ab z_b: a weighted sum of the peers' LOGITS (pro: B x C x P)."""
    return torch.bmm(pro, attention.transpose(1, 2))


class _GradScale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale` (CL-ILR backprop rescaling, scale = 1/m)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


# ----------------------------------------------------------------------------------------------------- models ----
class OKDDipBranches(nn.Module):
    """Branch-based OKDDip: m - 1 peers with attention + 1 group leader (the last branch).

    ensemble=True (Table 4: an ensemble with an equal number of learners) makes all m branches peers, no leader.
    For DenseNet with the released shared block (`shared_block=True`) the released forward is kept: all m branches
    enter the attention, and the leader is computed from the last branch's block WITHOUT its final BN/ReLU.
    """

    def __init__(self, arch, num_classes=10, num_branches=4, factor=8, ensemble=False, branch_dropout=0.5,
                 shared_block=True):
        super().__init__()
        if num_branches < (2 if ensemble else 3):
            raise ValueError(f"OKDDip needs at least {2 if ensemble else 3} branches "
                             f"({'peers' if ensemble else 'two peers and a leader'}); got --num_branches {num_branches}")
        # The released vgg_GL leaves Linear biases at their default init.
        self.fam = family(arch, num_classes, branch_dropout=branch_dropout, zero_linear_bias=False,
                          shared_block=shared_block)
        self.num_branches, self.ensemble = num_branches, ensemble
        self.fam.build_trunk(self)
        for i in range(num_branches):
            layer, classifier = self.fam.make_branch()
            setattr(self, self.fam.layer_name(i), layer)
            setattr(self, self.fam.classifier_name(i), classifier)
        width = self.fam.feature_dim
        self.query_weight = nn.Linear(width, width // factor, bias=False)
        self.key_weight = nn.Linear(width, width // factor, bias=False)
        self.fam.init(self)
        self.dense_quirk = isinstance(self.fam, DenseNetFamily) and shared_block and not ensemble

    def branch(self, i, t):
        h = self.fam.features(getattr(self, self.fam.layer_name(i)), t)
        return h, getattr(self, self.fam.classifier_name(i))(h)

    def forward(self, x):
        t = self.fam.run_trunk(self, x)
        num_peers = self.num_branches if (self.ensemble or self.dense_quirk) else self.num_branches - 1
        hs, zs = zip(*[self.branch(i, t) for i in range(num_peers)])
        with float32(x):
            h, pro = torch.stack(hs, 1).float(), torch.stack(zs, -1).float()
            q, k, energy, attention = peer_attention(h, self.query_weight, self.key_weight)
            x_m = aggregate(pro, attention)
        out = {"pro": pro, "x_m": x_m, "peer_features_h": h, "query_proj": q, "key_proj": k, "energy": energy,
               "attention": attention}
        if self.ensemble:
            return out
        last = self.num_branches - 1
        if self.dense_quirk:
            out["num_peers"] = self.num_branches - 1
            layer = getattr(self, self.fam.layer_name(last))
            h_lead = F.adaptive_avg_pool2d(layer.block(t), 1).flatten(1)
            out["leader"] = getattr(self, self.fam.classifier_name(last))(h_lead)
        else:
            h_lead, out["leader"] = self.branch(last, t)
        out["leader_features_h"] = h_lead
        return out


class ONEBranches(nn.Module):
    """ONE (gate), CL-ILR (avg=True: leave-one-out mean of the other branches' logits) or individual branches.

    The gate (built whenever avg=False, as released, even in --ind mode) is: global pool of the trunk output ->
    Linear -> BatchNorm1d -> ReLU -> softmax over branches. bpscale divides the gradient into the trunk by m.
    vgg_double_pass keeps the released vgg_one quirk of running every branch twice per ONE forward.
    """

    def __init__(self, arch, num_classes=10, num_branches=4, ind=False, avg=False, bpscale=False,
                 branch_dropout=0.5, shared_block=True, gate_bn_init="ones", vgg_double_pass=True):
        super().__init__()
        if num_branches < 2:
            raise ValueError(f"ONE/CL-ILR need at least 2 branches; got --num_branches {num_branches}")
        self.fam = family(arch, num_classes, branch_dropout=branch_dropout, shared_block=shared_block)
        self.num_branches, self.ind, self.avg, self.bpscale = num_branches, ind, avg, bpscale
        trunk_channels = self.fam.build_trunk(self)
        for i in range(num_branches):
            layer, classifier = self.fam.make_branch()
            setattr(self, self.fam.layer_name(i), layer)
            setattr(self, self.fam.classifier_name(i), classifier)
        if not avg:
            self.control_v1 = nn.Linear(trunk_channels, num_branches)
            self.bn_v1 = nn.BatchNorm1d(num_branches)
        self.fam.init(self)
        if not avg and gate_bn_init == "uniform":
            # torch <= 1.1 (the authors' 1.0.1) initialised BatchNorm weights U(0, 1); the init loop never resets bn_v1
            nn.init.uniform_(self.bn_v1.weight)
        elif gate_bn_init not in ("ones", "uniform"):
            raise ValueError(f"gate_bn_init must be 'ones' or 'uniform', got {gate_bn_init!r}")
        self.double_pass = vgg_double_pass and isinstance(self.fam, VGGFamily) and not (avg or ind)

    def forward(self, x):
        t = self.fam.run_trunk(self, x)
        if self.bpscale:
            t = _GradScale.apply(t, 1.0 / self.num_branches)
        branches = range(self.num_branches)
        run = lambda: torch.stack([getattr(self, self.fam.classifier_name(i))(
            self.fam.features(getattr(self, self.fam.layer_name(i)), t)) for i in branches], -1)
        if self.double_pass:
            run()  # discarded, as released: BN statistics move twice, dropout masks differ
        pro = run()
        out = {"pro": pro}
        if self.ind:
            out["x_m"] = None
            return out
        with float32(x):
            pro = out["pro"] = pro.float()
            if self.avg:
                m = self.num_branches
                out["x_m"] = (pro.sum(-1, keepdim=True) - pro) / (m - 1)
            else:
                pooled = F.adaptive_avg_pool2d(t.float(), 1).flatten(1)
                pre = self.bn_v1(self.control_v1(pooled))
                gate = F.softmax(F.relu(pre), dim=1)
                out.update(x_m=(pro * gate.unsqueeze(1)).sum(-1), gate_input_pooled_shared_features=pooled,
                           gate_bn_output_prerelu=pre, gate_weights=gate)
        return out


class IndependentNets(nn.Module):
    """m independent plain networks stu0..stu{m-1} (DML). attention=True adds OKDDip's shared query/key over the
    first m - 1 networks' pooled features with stu{m-1} as the leader (network-based OKDDip, --MulStu), or over all
    m networks with ensemble=True."""

    def __init__(self, arch, num_classes=10, num_branches=4, dropout=0.0, attention=False, factor=8,
                 ensemble=False):
        super().__init__()
        if num_branches < 2 or (attention and not ensemble and num_branches < 3):
            raise ValueError(f"--num_branches {num_branches} is too small for this method "
                             f"(DML needs 2, network-based OKDDip 3: two peers and a leader)")
        self.num_branches, self.attention, self.ensemble = num_branches, attention, ensemble
        for i in range(num_branches):
            setattr(self, f"stu{i}", plain_network(arch, num_classes, dropout=dropout, KD=True))
        if attention:
            width = self.stu0.feature_dim
            self.query_weight = nn.Linear(width, width // factor, bias=False)
            self.key_weight = nn.Linear(width, width // factor, bias=False)
            if arch in vgg.STAGES:
                for lin in (self.query_weight, self.key_weight):
                    nn.init.normal_(lin.weight, 0, 0.01)

    def forward(self, x):
        hs, zs = zip(*[getattr(self, f"stu{i}")(x) for i in range(self.num_branches)])
        if not self.attention:
            return {"pro": torch.stack(zs, -1)}
        num_peers = self.num_branches if self.ensemble else self.num_branches - 1
        with float32(x):
            h, pro = torch.stack(hs[:num_peers], 1).float(), torch.stack(zs[:num_peers], -1).float()
            q, k, energy, attention = peer_attention(h, self.query_weight, self.key_weight)
            x_m = aggregate(pro, attention)
        out = {"pro": pro, "x_m": x_m, "peer_features_h": h, "query_proj": q, "key_proj": k, "energy": energy,
               "attention": attention}
        if not self.ensemble:
            out["leader"], out["leader_features_h"] = zs[-1], hs[-1]
        return out
