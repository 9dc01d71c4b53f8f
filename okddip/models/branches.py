"""The multi-student models: shared trunk + independent last stage per branch, or independent networks.

* A family per architecture says what is shared (ResNet: stem..layer2 on CIFAR, stem..layer3 on ImageNet; VGG:
  through layer3; DenseNet: through the second transition), registers the branches and the method's head
  (OKDDip's query/key, ONE's gate) under the released key names and in the released construction order (so a seeded
  construction draws the RNG as the released one), and computes one branch's pooled features.
* `OKDDipBranches` (released resnet_GL / vgg_GL / densenet_GL), `ONEBranches` (resnet_one / vgg_one /
  densenet_one: ONE, CL-ILR, individual branches), `IndependentNets` (DML.MutualNet, and MultiNet.StuNet for
  network-based OKDDip when `attention=True`).

Every forward returns a dict of tensors (B = batch, C = classes):
    pro      (B, C, P)  student logits, one column per peer/branch/network
    x_m      (B, C, P)  OKDDip: attention-aggregated peer logits; CL-ILR: leave-one-out mean; ONE: (B, C) gated
    leader   (B, C)     OKDDip group leader (absent in ensemble mode and for the other methods)
and, where they exist, the attention intermediates (features h, query/key projections, energy, attention) and the
ONE gate intermediates. The forwards run in the released order (per peer: features, query, key, classifier; the
targets from the concatenated logits), so a float32 run rounds as the authors' code does.

Under --amp bf16 the attention, the gate and the targets built from logits run with autocast off, on inputs taken to
at least float32 (`at_least_fp32`: float64 stays float64 for the parity checker).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.fast import at_least_fp32
from okddip.models import densenet, resnet, vgg


def add_attention(owner, width, factor):
    """OKDDip's shared, bias-free query and key projections F -> F / factor."""
    owner.query_weight = nn.Linear(width, width // factor, bias=False)
    owner.key_weight = nn.Linear(width, width // factor, bias=False)


def add_gate(owner, channels, num_branches):
    """ONE's gate: pooled trunk features -> Linear -> BatchNorm1d (-> ReLU -> softmax in the forward)."""
    owner.control_v1 = nn.Linear(channels, num_branches)
    owner.bn_v1 = nn.BatchNorm1d(num_branches)


# --------------------------------------------------------------------------------------------------- families ----
class ResNetFamily:
    """Released resnet_GL / resnet_one: layer3_i + classifier3_i per branch (layer4_i / classifier4_i for the
    ImageNet ResNet-34), interleaved, then the head; the init loop (conv and BN only) runs last."""

    def __init__(self, arch, num_classes, **_):
        self.block, self.layers, self.base_width, self.imagenet = resnet.CONFIGS[arch]
        self.num_classes = num_classes
        self.last = len(self.layers)  # the last stage is per-branch
        self.feature_dim = resnet.stage_planes(self.imagenet)[-1] * self.block.expansion

    def layer(self, owner, i):
        return getattr(owner, f"layer{self.last}_{i}")

    def classifier(self, owner, i):
        return getattr(owner, f"classifier{self.last}_{i}")

    def build(self, owner, num_branches, head, factor=8):
        inplanes = resnet.build_stem(owner, self.imagenet)
        planes = resnet.stage_planes(self.imagenet)
        for i in range(self.last - 1):
            stage, inplanes = resnet.make_stage(self.block, inplanes, planes[i], self.layers[i], 1 if i == 0 else 2,
                                                self.base_width)
            setattr(owner, f"layer{i + 1}", stage)
        for i in range(num_branches):
            layer, out = resnet.make_stage(self.block, inplanes, planes[-1], self.layers[-1], 2, self.base_width)
            setattr(owner, f"layer{self.last}_{i}", layer)
            setattr(owner, f"classifier{self.last}_{i}", nn.Linear(out, self.num_classes))
        if head == "attention":
            add_attention(owner, self.feature_dim, factor)
        elif head == "gate":
            add_gate(owner, inplanes, num_branches)
        resnet.init_resnet(owner)

    def run_trunk(self, owner, x):
        x = resnet.run_stem(owner, x)
        for i in range(self.last - 1):
            x = getattr(owner, f"layer{i + 1}")(x)
        return x

    def features(self, owner, i, t):
        return F.adaptive_avg_pool2d(self.layer(owner, i)(t), 1).flatten(1)

    @staticmethod
    def gate_pool(t):
        return F.avg_pool2d(t, t.shape[-2:]).flatten(1)  # the released AvgPool2d(16) over the 16x16 trunk output


class VGGFamily:
    """Released vgg_GL / vgg_one: the trunk through layer3, then layer3_i (the plain network's layer4) + an MLP
    classifier3_i per branch, interleaved, then the head; the init loop runs last and also draws the head's Linear
    weights N(0, 0.01). vgg_GL leaves the Linear biases at their default init, vgg_one zeroes them."""

    def __init__(self, arch, num_classes, branch_dropout=0.5, **_):
        self.arch, self.num_classes, self.dropout = arch, num_classes, branch_dropout
        self.feature_dim = 512

    @staticmethod
    def layer(owner, i):
        return getattr(owner, f"layer3_{i}")

    @staticmethod
    def classifier(owner, i):
        return getattr(owner, f"classifier3_{i}")

    def build(self, owner, num_branches, head, factor=8):
        channels = vgg.build_vgg_trunk(owner, self.arch, 3)
        ch, n = vgg.STAGES[self.arch][3]
        for i in range(num_branches):
            setattr(owner, f"layer3_{i}", vgg.conv_stage(channels, ch, n))
            setattr(owner, f"classifier3_{i}", vgg.mlp_classifier(self.num_classes, self.dropout))
        if head == "attention":
            add_attention(owner, self.feature_dim, factor)
        elif head == "gate":
            add_gate(owner, ch, num_branches)
        vgg.init_vgg(owner, zero_linear_bias=head != "attention")

    def run_trunk(self, owner, x):
        return vgg.run_vgg_trunk(owner, x, 3)

    def features(self, owner, i, t):
        return self.layer(owner, i)(t).flatten(1)

    @staticmethod
    def gate_pool(t):
        return F.adaptive_avg_pool2d(t, 1).flatten(1)


class DenseNetFamily:
    """Released densenet_GL / densenet_one: `features` through the second transition, the last dense block
    registered as Branch<i> (GL) or layer3_<i> (ONE), [ONE's gate], norm_final_<i>, classifier3_<i>, the init loop,
    and [GL's query/key, created after the init loop: default init].

    shared_block=True reproduces the released code: ONE dense-block object serves as the last block of every branch
    (all branches share its weights); only norm_final_<i> and the classifier differ."""

    def __init__(self, arch, num_classes, shared_block=True, **_):
        self.arch, self.num_classes, self.shared_block = arch, num_classes, shared_block

    def layer(self, owner, i):
        return getattr(owner, f"{self.block_prefix}{i}")

    @staticmethod
    def classifier(owner, i):
        return getattr(owner, f"classifier3_{i}")

    def build(self, owner, num_branches, head, factor=8):
        self.block_prefix = "Branch" if head == "attention" else "layer3_"
        owner.features, channels, growth, n = densenet.dense_trunk(self.arch)
        block = None
        for i in range(num_branches):
            if block is None or not self.shared_block:
                block = densenet.DenseBlock(channels, growth, n)
            setattr(owner, f"{self.block_prefix}{i}", block)
        if head == "gate":
            add_gate(owner, channels, num_branches)
        for i in range(num_branches):
            setattr(owner, f"norm_final_{i}", nn.BatchNorm2d(block.out_channels))
        for i in range(num_branches):
            setattr(owner, f"classifier3_{i}", nn.Linear(block.out_channels, self.num_classes))
        densenet.init_densenet(owner)
        if head == "attention":
            add_attention(owner, block.out_channels, factor)

    @staticmethod
    def run_trunk(owner, x):
        return owner.features(x)

    def features(self, owner, i, t):
        t = F.relu(getattr(owner, f"norm_final_{i}")(self.layer(owner, i)(t)), inplace=True)
        return F.adaptive_avg_pool2d(t, 1).flatten(1)

    @staticmethod
    def gate_pool(t):
        return F.avg_pool2d(t, t.shape[-2:]).flatten(1)  # the released AvgPool2d(8) over the 8x8 trunk output


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
def autocast_off(x):
    """No autocast: under --amp bf16 the attention, the gate and the logit targets run in (at least) float32."""
    return torch.autocast(x.device.type, enabled=False)


def grow(stack, column, dim):
    """COLUMN concatenated onto STACK along DIM (the released forwards build their outputs column by column)."""
    return column if stack is None else torch.cat([stack, column], dim)


def project(owner, h):
    """(h, q, k) for one peer's pooled features h (B x F): q = W_L h, k = W_E h, in at least float32, (B, 1, F/8)."""
    h = at_least_fp32(h)
    return h, owner.query_weight(h)[:, None, :], owner.key_weight(h)[:, None, :]


def peer_targets(pro, q, k):
    """alpha_ab = softmax_b(q_a . k_b) (plain dot product, self included); x_m[:, :, a] = sum_b alpha_ab z_b, a
    weighted sum of the peers' LOGITS (pro: B x C x P, q and k: B x P x F/8)."""
    energy = torch.bmm(q, k.transpose(1, 2))
    attention = F.softmax(energy, dim=-1)
    return energy, attention, torch.bmm(pro, attention.transpose(1, 2))


class _GradScale(torch.autograd.Function):
    """Identity forward; backward divides the gradient by `num_branches` (CL-ILR backprop rescaling)."""

    @staticmethod
    def forward(ctx, x, num_branches):
        ctx.num_branches = num_branches
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.num_branches, None


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
        self.fam = family(arch, num_classes, branch_dropout=branch_dropout, shared_block=shared_block)
        self.num_branches, self.ensemble = num_branches, ensemble
        self.fam.build(self, num_branches, "attention", factor)
        self.dense_quirk = isinstance(self.fam, DenseNetFamily) and shared_block and not ensemble

    def forward(self, x):
        t = self.fam.run_trunk(self, x)
        num_peers = self.num_branches if (self.ensemble or self.dense_quirk) else self.num_branches - 1
        hs, pro, q, k = [], None, None, None
        for a in range(num_peers):
            h = self.fam.features(self, a, t)
            with autocast_off(x):
                h32, q_a, k_a = project(self, h)
            z = self.fam.classifier(self, a)(h).unsqueeze(-1)
            hs.append(h32)
            with autocast_off(x):
                pro, q, k = grow(pro, at_least_fp32(z), -1), grow(q, q_a, 1), grow(k, k_a, 1)
        with autocast_off(x):
            energy, attention, x_m = peer_targets(pro, q, k)
        out = {"pro": pro, "x_m": x_m, "peer_features_h": torch.stack(hs, 1), "query_proj": q, "key_proj": k,
               "energy": energy, "attention": attention}
        if self.ensemble:
            return out
        last = self.num_branches - 1
        if self.dense_quirk:
            out["num_peers"] = self.num_branches - 1
            h_lead = F.adaptive_avg_pool2d(self.fam.layer(self, last)(t), 1).flatten(1)
        else:
            h_lead = self.fam.features(self, last, t)
        out["leader"], out["leader_features_h"] = self.fam.classifier(self, last)(h_lead), h_lead
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
        if gate_bn_init not in ("ones", "uniform"):
            raise ValueError(f"gate_bn_init must be 'ones' or 'uniform', got {gate_bn_init!r}")
        self.fam = family(arch, num_classes, branch_dropout=branch_dropout, shared_block=shared_block)
        self.num_branches, self.ind, self.avg, self.bpscale = num_branches, ind, avg, bpscale
        self.fam.build(self, num_branches, None if avg else "gate")
        if not avg and gate_bn_init == "uniform":
            # torch <= 1.1 (the authors' 1.0.1) initialised BatchNorm weights U(0, 1); the init loop never resets bn_v1
            nn.init.uniform_(self.bn_v1.weight)
        self.double_pass = vgg_double_pass and isinstance(self.fam, VGGFamily) and not (avg or ind)

    def branches(self, t):
        """Every branch's logits, concatenated column by column: (B, C, m)."""
        pro = None
        for i in range(self.num_branches):
            z = self.fam.classifier(self, i)(self.fam.features(self, i, t)).unsqueeze(-1)
            pro = grow(pro, z, -1)
        return pro

    def forward(self, x):
        t = self.fam.run_trunk(self, x)
        if self.bpscale:
            t = _GradScale.apply(t, self.num_branches)
        pro = self.branches(t)
        if self.ind:
            return {"pro": pro, "x_m": None}
        out, m = {}, self.num_branches
        with autocast_off(x):
            pro = at_least_fp32(pro)
            if self.avg:
                out["x_m"] = None
                for i in range(m):
                    out["x_m"] = grow(out["x_m"], self.leave_one_out(pro, i).unsqueeze(-1), -1)
            else:
                pooled = self.fam.gate_pool(at_least_fp32(t))
                pre = self.bn_v1(self.control_v1(pooled))
                gate = F.softmax(F.relu(pre), dim=1)
                out.update(gate_input_pooled_shared_features=pooled, gate_bn_output_prerelu=pre, gate_weights=gate)
        if self.double_pass:  # released vgg_one: every branch runs again; the second pass is what counts
            pro, x_m = None, None
            for i in range(m):
                z = self.fam.classifier(self, i)(self.fam.features(self, i, t))
                with autocast_off(x):
                    z = at_least_fp32(z)
                    x_m = self.gated(gate, z, i, x_m)
                    pro = grow(pro, z.unsqueeze(-1), -1)
            out["x_m"] = x_m
        elif not self.avg:
            with autocast_off(x):
                x_m = None
                for i in range(m):
                    x_m = self.gated(gate, pro[:, :, i], i, x_m)
            out["x_m"] = x_m
        out["pro"] = pro
        return out

    def leave_one_out(self, pro, i):
        # t_i = sum_{j != i} z_j / (m - 1), accumulated as released (each logit scaled, then added)
        m, total = self.num_branches, 0
        for j in range(m):
            if j != i:
                total = total + 1 / (m - 1) * pro[:, :, j]
        return total

    @staticmethod
    def gated(gate, z, i, x_m):
        # x_m = sum_i g_i z_i, accumulated branch by branch (g_i repeated over the classes, as released)
        term = gate[:, i].view(-1, 1).repeat(1, z.size(1)) * z
        return term if x_m is None else x_m + term


class IndependentNets(nn.Module):
    """m independent plain networks stu0..stu{m-1} (DML). attention=True adds OKDDip's shared query/key over the
    first m - 1 networks' pooled features with stu{m-1} as the leader (network-based OKDDip, --MulStu), or over all
    m networks with ensemble=True. The query/key keep PyTorch's default init, as in the released StuNet."""

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
            add_attention(self, self.stu0.feature_dim, factor)

    def forward(self, x):
        if not self.attention:
            pro = None
            for i in range(self.num_branches):
                pro = grow(pro, getattr(self, f"stu{i}")(x)[1].unsqueeze(-1), -1)
            return {"pro": pro}
        num_peers = self.num_branches if self.ensemble else self.num_branches - 1
        hs, pro, q, k = [], None, None, None
        for a in range(num_peers):
            h, z = getattr(self, f"stu{a}")(x)
            with autocast_off(x):
                h32, q_a, k_a = project(self, h)
                hs.append(h32)
                column = at_least_fp32(z).unsqueeze(-1)
                q, k, pro = grow(q, q_a, 1), grow(k, k_a, 1), grow(pro, column, -1)
        with autocast_off(x):
            energy, attention, x_m = peer_targets(pro, q, k)
        out = {"pro": pro, "x_m": x_m, "peer_features_h": torch.stack(hs, 1), "query_proj": q, "key_proj": k,
               "energy": energy, "attention": attention}
        if not self.ensemble:
            out["leader_features_h"], out["leader"] = getattr(self, f"stu{self.num_branches - 1}")(x)
        return out
