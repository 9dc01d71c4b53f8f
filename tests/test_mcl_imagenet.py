"""L-MCL ImageNet (mcl/): 4-head networks against the spec's parameter table, the memory-bank contrast, and both
ImageNet scripts under torchrun (2 processes, gloo on the CPU) on the synthetic ImageFolder (4 classes)."""
import os
import subprocess
import sys

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.logging import read_log
from conftest import REPO
from mcl.memory_bank import ContrastiveIndices, MemoryBank, memory_mcl_loss
from mcl.models import Aggregator, EmbedHeads, LossWeightNetwork, build_imagenet_baseline, networks_of
from mcl.models.pairs import IMAGENET_AUXILIARY, IMAGENET_HETEROGENEOUS, build_imagenet_pair


def count(module):
    return sum(p.numel() for p in module.parameters())


# spec 2.7 (1000 classes): deployed backbone, auxiliary branches per network; loss-side modules of a homogeneous pair
NETWORKS = {"resnet18": (11689512, 14626488), "resnet34": (21797672, 14626488), "resnet50": (25557032, 27669944),
            "ShuffleNetV2_1x": (2278604, 6119796)}
LOSS_MODULES = {"resnet18": (657408, 2102280, 525312), "resnet34": (657408, 2102280, 525312),
                "resnet50": (2230272, 33574920, 2098176), "ShuffleNetV2_1x": (1181696, 8398856, 1049600)}
PAIR_TOTALS = {"lmcl_resnet18_imagenet": 52632000, "lmcl_resnet34_imagenet": 72848320,
               "lmcl_resnet50_imagenet": 106453952, "lmcl_ShuffleNetV2_1x_imagenet": 16796800,
               "lmcl_res18_shufflenetv2_1x_imagenet": 34714400, "lmcl_res50_shufflenetv2_1x_imagenet": 61625376,
               "lmcl_res18_res50_imagenet": 79542976}
WIDTH = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "ShuffleNetV2_1x": 1024}


def test_imagenet_parameter_counts_match_the_spec_table():
    for name, (backbone, aux) in NETWORKS.items():
        net = IMAGENET_AUXILIARY[name]()
        assert (count(net.backbone), count(net.auxiliary_classifier)) == (backbone, aux), name
        d = WIDTH[name]
        heads = (EmbedHeads([d, d], 4), Aggregator([d, d], 4), LossWeightNetwork([[d] * 4] * 2))
        assert tuple(count(m) for m in heads) == LOSS_MODULES[name], name
    for arch, total in PAIR_TOTALS.items():  # totals from the per-network counts (and the factories' order)
        names = IMAGENET_HETEROGENEOUS.get(arch) or (arch.removeprefix("lmcl_").removesuffix("_imagenet"),) * 2
        assert sum(sum(NETWORKS[n]) for n in names) == total, arch
    assert count(build_imagenet_baseline("ShuffleNetV2_1x_imagenet")) == NETWORKS["ShuffleNetV2_1x"][0]
    pair = build_imagenet_pair("lmcl_res18_shufflenetv2_1x_imagenet", num_classes=10)
    features, logits = pair.eval()(torch.zeros(1, 3, 64, 64))
    assert [[h.shape[1] for h in f] for f in features] == [[512] * 4, [1024] * 4]  # net1 = ResNet-18
    assert [[z.shape[1] for z in n] for n in logits] == [[10] * 4] * 2 and len(networks_of(pair)) == 2


# Keys and shapes read in the authors' models/lmcl_resnet_imagenet.py and lmcl_shufflenetv2_imagenet.py (no
# fingerprint exists): torchvision names in the backbone, `block_extractor<m>` = Sequential of one-block stages
# (ResNet) or of stages + 1x1 conv + BN + ReLU (ShuffleNetV2), `fc<m>` classifiers. Entries per network, counted by
# hand from their files (a BN holds 5 entries): ResNet-18 122 + 114 (BasicBlock 12, with projection 18; three
# branches of 3 + 2 + 1 one-block stages with projections, 3 classifiers), ResNet-34 218 + 114, ResNet-50 320 + 150
# (Bottleneck 18, with projection 24), ShuffleNetV2 338 + 492 (DownBlock 30, BasicBlock 18).
IMAGENET_LAYOUTS = {
    "resnet18": (236, {"backbone.conv1.weight": [64, 3, 7, 7], "backbone.layer4.1.bn2.running_var": [512],
                       "backbone.fc.weight": [1000, 512],
                       "auxiliary_classifier.block_extractor1.0.0.downsample.0.weight": [128, 64, 1, 1],
                       "auxiliary_classifier.block_extractor1.2.0.conv2.weight": [512, 512, 3, 3],
                       "auxiliary_classifier.block_extractor2.1.0.conv1.weight": [512, 256, 3, 3],
                       "auxiliary_classifier.block_extractor3.0.0.bn2.num_batches_tracked": [],
                       "auxiliary_classifier.fc3.bias": [1000]}),
    "resnet34": (332, {"backbone.layer3.5.conv2.weight": [256, 256, 3, 3],
                       "auxiliary_classifier.block_extractor2.0.0.downsample.1.running_mean": [256]}),
    "resnet50": (470, {"backbone.layer1.0.downsample.0.weight": [256, 64, 1, 1],
                       "auxiliary_classifier.block_extractor1.0.0.conv1.weight": [128, 256, 1, 1],
                       "auxiliary_classifier.block_extractor1.0.0.conv3.weight": [512, 128, 1, 1],
                       "auxiliary_classifier.block_extractor3.0.0.downsample.0.weight": [2048, 1024, 1, 1],
                       "auxiliary_classifier.fc1.weight": [1000, 2048]}),
    "ShuffleNetV2_1x": (830, {"backbone.conv1.weight": [24, 3, 3, 3], "backbone.layer1.0.conv1.weight": [24, 1, 3, 3],
                               "backbone.layer3.3.bn3.bias": [232], "backbone.conv2.weight": [1024, 464, 1, 1],
                               "backbone.linear.weight": [1000, 1024],
                               "auxiliary_classifier.block_extractor1.0.0.conv1.weight": [24, 1, 3, 3],
                               "auxiliary_classifier.block_extractor1.2.1.conv2.weight": [232, 1, 3, 3],
                               "auxiliary_classifier.block_extractor1.3.weight": [1024, 464, 1, 1],
                               "auxiliary_classifier.block_extractor1.4.running_var": [1024],
                               "auxiliary_classifier.block_extractor2.0.7.conv3.weight": [116, 116, 1, 1],
                               "auxiliary_classifier.block_extractor2.2.weight": [1024, 464, 1, 1],
                               "auxiliary_classifier.block_extractor3.1.weight": [1024, 464, 1, 1],
                               "auxiliary_classifier.fc3.weight": [1000, 1024]}),
}


@pytest.mark.parametrize("name", sorted(IMAGENET_LAYOUTS))
def test_imagenet_state_dict_keys_are_the_authors(name):
    entries, keys = IMAGENET_LAYOUTS[name]
    with torch.device("meta"):
        pair = build_imagenet_pair(f"lmcl_{name}_imagenet")
    state = {k: list(v.shape) for k, v in pair.state_dict().items()}
    assert len(state) == 2 * entries
    for key, shape in keys.items():
        for i in (0, 1):
            assert state[f"module_list.{i}.{key}"] == shape, key


def test_imagenet_resnet_auxiliary_classifiers_keep_pytorchs_default_init():
    """The authors' ResNet Auxiliary_Classifier re-initialises convs and BNs only: fc biases stay U(-1/sqrt(d),
    1/sqrt(d)), not zero (their models/lmcl_resnet_imagenet.py)."""
    torch.manual_seed(0)
    aux = IMAGENET_AUXILIARY["resnet18"](num_classes=10).auxiliary_classifier
    bound = 1 / 512 ** 0.5
    for fc in (aux.fc1, aux.fc2, aux.fc3):
        assert fc.bias.abs().max() <= bound and fc.bias.abs().min() > 0 and fc.bias.std() > bound / 4


class Labels(torch.utils.data.Dataset):
    targets = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, n):
        return torch.zeros(1), self.targets[n]


def test_contrast_indices_and_memory_update():
    torch.manual_seed(0)
    data = ContrastiveIndices(Labels(), pos_k=1, neg_k=64)
    labels = torch.tensor(Labels.targets)
    for n in range(len(labels)):
        _, target = data[n]
        label, row = target[0], target[1:]
        assert label == labels[n] and row.shape == (66,) and row[0] == n and labels[row[1]] == labels[n]
        assert row[1] != n or n == 9  # index 9 is alone in its class: its own slot is its positive
        assert (labels[row[2:]] != labels[n]).all()
    memory = MemoryBank(2, 10, feat_dim=8, momentum=0.5)
    bound = 1 / (8 / 3) ** 0.5
    assert memory.memory_0.abs().max() <= bound and not torch.equal(memory.memory_0, memory.memory_1)
    before = memory.memory_1.clone()
    e = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    memory.update_(torch.tensor([3, 7]), [e, e])
    expected = torch.nn.functional.normalize(0.5 * before[[3, 7]] + 0.5 * e, dim=1)
    assert torch.allclose(memory.memory_1[[3, 7]], expected, atol=1e-6)
    untouched = [i for i in range(10) if i not in (3, 7)]
    assert torch.equal(memory.memory_1[untouched], before[untouched])


def test_memory_contrast_terms():
    torch.manual_seed(0)
    emb = [[torch.nn.functional.normalize(torch.randn(4, 8), dim=1) for _ in range(4)] for _ in range(2)]
    banks = [torch.nn.functional.normalize(torch.randn(10, 8), dim=1) for _ in range(2)]
    idx = torch.randint(0, 10, (4, 6))
    weights = [torch.rand(4) for _ in range(32)]
    out = memory_mcl_loss(emb, weights, banks, idx)
    # ICL of the first combination by hand: net 2 head 1 against memory 1, positives = own + same-class slots
    s = torch.einsum("bkd,bd->bk", banks[0][idx], emb[1][0]) / 0.07
    s2 = torch.einsum("bkd,bd->bk", banks[1][idx], emb[0][0]) / 0.07
    c = -(weights[0] * (s[:, :2] - torch.logsumexp(s, 1, keepdim=True)).mean(1)).mean()
    c2 = -(weights[0] * (s2[:, :2] - torch.logsumexp(s2, 1, keepdim=True)).mean(1)).mean()
    alone = memory_mcl_loss([[emb[0][0]], [emb[1][0]]], [weights[0], weights[0]], banks, idx)
    assert torch.allclose(alone["icl"], 2 * (c + c2), atol=1e-5)
    assert torch.allclose(out["loss_mcl"], 0.01 * out["vcl"] + out["soft_vcl"] + 0.01 * out["icl"] + out["soft_icl"])
    # the released VCL reads the first network's memory for both terms; the switch only changes the VCL terms
    fixed = memory_mcl_loss(emb, weights, banks, idx, vcl_own_memory=True)
    assert torch.equal(fixed["icl"], out["icl"]) and not torch.allclose(fixed["vcl"], out["vcl"])


SMOKE = ["--batch-size", "4", "--eval-batches", "1", "--num-workers", "0", "--image-size", "64", "--quiet",
         "--seed", "1", "--epochs", "1"]


def torchrun(script, args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
           *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO / "mcl", capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_imagenet_baseline_under_torchrun(synthetic_root, tmp_path):
    run = tmp_path / "baseline"
    torchrun("main_imagenet_baseline.py", ["--arch", "ShuffleNetV2_1x_imagenet", "--steps-per-epoch", "2",
                                           "--data-root", synthetic_root / "imagenet", "--run-dir", run, *SMOKE])
    (record,) = read_log(run)  # one line: only rank 0 writes
    assert {"train/loss", "train/net/top1", "test/net/loss", "test/net/top1", "test/net/top5"} <= set(record)
    # 4 classes x 4 val images, split over the two processes without repeats: top-1 is a multiple of 1/16
    assert abs(record["test/net/top1"] * 16 / 100 - round(record["test/net/top1"] * 16 / 100)) < 1e-6
    ckpt = load_checkpoint(run / "checkpoint.pt")
    model = build_imagenet_baseline("ShuffleNetV2_1x_imagenet", num_classes=4)
    model.load_state_dict(ckpt["run"]["net"])
    assert ckpt["epochs_done"] == 1 and ckpt["run"]["optimizer"]["state"] and (run / "finished").exists()


@pytest.mark.slow
def test_imagenet_lmcl_under_torchrun_with_meta_step(synthetic_root, tmp_path):
    run = tmp_path / "lmcl"
    torchrun("main_layer_mcl_imagenet_meta.py", ["--arch", "lmcl_ShuffleNetV2_1x_imagenet", "--steps-per-epoch", "1",
                                                 "--neg_k", "16", "--data-root", synthetic_root / "imagenet",
                                                 "--run-dir", run, *SMOKE])
    (record,) = read_log(run)
    for key in ("train/loss", "train/loss_vcl", "train/loss_soft_icl", "train/net1/aux3/top1",
                "train/net2/aggregated/top1", "test/net1/top1", "test/net2/aux3/top5", "test/max_heads/top1"):
        assert key in record, key
    ckpt = load_checkpoint(run / "checkpoint.pt")["run"]
    pair = build_imagenet_pair("lmcl_ShuffleNetV2_1x_imagenet", num_classes=4)
    pair.load_state_dict(ckpt["net"])
    assert ckpt["memory"]["memory_0"].shape == (48, 128)  # one slot per synthetic training image
    assert ckpt["weight_optimizer"]["state"], "the meta step never updated the weight network"
    # 1 training step + the meta step's extra BN update
    assert ckpt["net"]["module_list.0.backbone.bn1.num_batches_tracked"].item() == 2


@pytest.mark.slow
def test_imagenet_lmcl_runs_as_one_plain_process(synthetic_root, tmp_path):
    run = tmp_path / "plain"
    result = subprocess.run([sys.executable, "main_layer_mcl_imagenet_meta.py", "--arch",
                             "lmcl_ShuffleNetV2_1x_imagenet", "--steps-per-epoch", "1", "--neg_k", "16",
                             "--data-root", str(synthetic_root / "imagenet"), "--run-dir", str(run), *SMOKE],
                            cwd=REPO / "mcl", capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_log(run)) == 1


def test_imagenet_bad_flags_fail_clearly(tmp_path):
    for script, args, message in (
            ("main_layer_mcl_imagenet_meta.py", ["--arch", "lmcl_resnet19_imagenet"], "lmcl_resnet18_imagenet"),
            ("main_layer_mcl_imagenet_meta.py", ["--neg_k", "0"], "--neg_k must be positive; got 0"),
            ("main_imagenet_baseline.py", ["--arch", "resnet34"], "resnet34_imagenet")):
        result = subprocess.run([sys.executable, script, *args, "--run-dir", str(tmp_path / "run"), "--data-root",
                                 str(tmp_path)], cwd=REPO / "mcl", capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_published_imagenet_table():
    from mcl.published import SMOKE as RUNS, TABLES
    (table,) = [t for t in TABLES if t.id == "table10"]
    assert all(r.launcher == "torchrun" and (REPO / "mcl" / r.argv[0]).exists() for r in table.rows)
    values = {(r.argv[2], r.key): r.value for r in table.rows}
    assert values[("lmcl_res18_shufflenetv2_1x_imagenet", "test/net1/top1")] == 71.16  # net1 = ResNet-18
    assert values[("lmcl_res50_shufflenetv2_1x_imagenet", "test/net1/top1")] == 66.44  # net1 = ShuffleNetV2
    assert values[("resnet34_imagenet", "test/net/top1")] == 73.68
    assert [r.nproc for r in RUNS if r.dataset == "imagenet"] == [2, 2]
