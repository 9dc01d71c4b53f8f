"""Published L-MCL numbers (authors' README, spec 6.1: CIFAR-100 tables 8-9, ImageNet table 10) and the commands
that reproduce them.

The released logs report, per network, the best-epoch test top-1 maximised over all heads of the network (auxiliary
heads included); the deployed network is only the backbone head. Each L-MCL result therefore has two rows: "as
released" (key test/netN/max_heads/top1) and "deployed head" (key test/netN/top1). The README does not say which
one it printed, nor whether a homogeneous row is network 1, the mean or the better network (spec 8.2-8.3); the rows
compare network 1 for homogeneous pairs.
"""
from common.results import Row, Run, Table

def bench_arch(arch):
    """The common.bench case name (mcl/bench.py) of a script's --arch: resnet32_cifar -> resnet32,
    lmcl_res32_res110_cifar -> res32_res110, lmcl_resnet34_imagenet -> resnet34_imagenet."""
    return arch.removeprefix("lmcl_").removesuffix("_cifar")


SOURCE = "authors' README (winycg/L-MCL, HEAD 2c0901e), transcribed in specs/mcl.md 6.1"
CIFAR_EPOCHS = 300

# name, baseline arch, L-MCL arch, baseline top-1, L-MCL top-1
HOMOGENEOUS = [
    ("ResNet-32", "resnet32_cifar", "lmcl_resnet32_cifar", 70.91, 75.82),
    ("ResNet-56", "resnet56_cifar", "lmcl_resnet56_cifar", 73.15, 77.51),
    ("ResNet-110", "resnet110_cifar", "lmcl_resnet110_cifar", 75.29, 79.48),
    ("WRN-16-2", "wrn_16_2_cifar", "lmcl_wrn_16_2_cifar", 72.55, 77.31),
    ("WRN-40-2", "wrn_40_2_cifar", "lmcl_wrn_40_2_cifar", 76.89, 80.96),
    ("ShuffleNetV2 0.5x", "ShuffleNetV2_05x_cifar", "lmcl_ShuffleNetV2_05x_cifar", 67.39, 72.61),
    ("ShuffleNetV2 1x", "ShuffleNetV2_1x_cifar", "lmcl_ShuffleNetV2_1x_cifar", 70.93, 77.25),
    ("HCGNet-A1", "hcgnet_A1_cifar", "lmcl_hcgnet_A1_cifar", 77.42, 81.66),
    ("HCGNet-A2", "hcgnet_A2_cifar", "lmcl_hcgnet_A2_cifar", 79.00, 83.14),
]

# names, L-MCL arch, (net1, net2) L-MCL top-1
HETEROGENEOUS = [
    (("ResNet-32", "ResNet-110"), "lmcl_res32_res110_cifar", (75.82, 79.71)),
    (("ResNet-56", "ResNet-110"), "lmcl_res56_res110_cifar", (77.04, 79.56)),
    (("WRN-16-2", "WRN-40-2"), "lmcl_wrn_16_2_wrn_40_2_cifar", (76.88, 80.24)),
    (("WRN-40-2", "WRN-28-4"), "lmcl_wrn_40_2_wrn_28_4_cifar", (80.42, 82.61)),
    (("ResNet-56", "WRN-40-2"), "lmcl_res56_wrn_40_2_cifar", (77.54, 80.72)),
    (("ResNet-110", "WRN-28-4"), "lmcl_res110_wrn_28_4_cifar", (80.02, 82.84)),
    (("ShuffleNetV2 1x", "ResNet-110"), "lmcl_shufflev2_res110_cifar", (76.85, 79.17)),
    (("ShuffleNetV2 1x", "WRN-40-2"), "lmcl_shufflev2_wrn_40_2_cifar", (77.06, 80.29)),
]

BASELINE_SCRIPT = "main_cifar_baseline.py"
LMCL_SCRIPT = "main_layer_mcl_cifar_meta.py"
SMOKE_BASELINE = ("--epochs", "1", "--batch-size", "16", "--steps-per-epoch", "3", "--eval-batches", "2",
                  "--num-workers", "0")
SMOKE_LMCL = ("--epochs", "1", "--batch-size", "16", "--steps-per-epoch", "2", "--eval-batches", "1",
              "--meta-freq", "2", "--num-workers", "0")
SHORT = ("--epochs", str(CIFAR_EPOCHS // 10))


def baseline_row(name, arch, value):
    return Row(name=f"{name}, baseline", value=value, key="test/net/top1", workdir="mcl",
               argv=(BASELINE_SCRIPT, "--arch", arch), match={"script": f"mcl/{BASELINE_SCRIPT}", "arch": arch},
               epochs=CIFAR_EPOCHS, protocol="best", source=SOURCE, statistic="single number (runs not stated)",
               scale_args={"smoke": SMOKE_BASELINE, "short": SHORT}, bench=("baseline", bench_arch(arch)))


def lmcl_rows(name, arch, net, value):
    """The as-released and the deployed-head row of network `net` (1-based) of a pair."""
    common = dict(value=value, workdir="mcl", argv=(LMCL_SCRIPT, "--arch", arch),
                  match={"script": f"mcl/{LMCL_SCRIPT}", "arch": arch}, epochs=CIFAR_EPOCHS, protocol="best",
                  source=SOURCE, statistic="single number (runs not stated)",
                  scale_args={"smoke": SMOKE_LMCL, "short": SHORT}, bench=("L-MCL", bench_arch(arch)))
    return [Row(name=f"{name}, L-MCL (net{net}, max over heads, as released)", key=f"test/net{net}/max_heads/top1",
                note="best epoch of the maximum top-1 over the network's 3 heads, as the released logs", **common),
            Row(name=f"{name}, L-MCL (net{net}, deployed head)", key=f"test/net{net}/top1",
                note="best epoch of the deployed backbone head; the README does not say which head it reports",
                **common)]


table8_rows = []
for name, base_arch, lmcl_arch, base, lmcl in HOMOGENEOUS:
    table8_rows.append(baseline_row(name, base_arch, base))
    table8_rows.extend(lmcl_rows(name, lmcl_arch, 1, lmcl))

table9_rows = [baseline_row("WRN-28-4", "wrn_28_4_cifar", 79.17)]
for (name1, name2), arch, (v1, v2) in HETEROGENEOUS:
    table9_rows.extend(lmcl_rows(f"{name1} & {name2}: {name1}", arch, 1, v1))
    table9_rows.extend(lmcl_rows(f"{name1} & {name2}: {name2}", arch, 2, v2))

# ImageNet (spec 6.1): global batch 256 over 2 processes in the authors' command, 100 epochs, best epoch
IMAGENET_EPOCHS = 100
IMAGENET_BASELINE_SCRIPT = "main_imagenet_baseline.py"
IMAGENET_LMCL_SCRIPT = "main_layer_mcl_imagenet_meta.py"
IMAGENET_SMOKE = ("--epochs", "1", "--batch-size", "4", "--steps-per-epoch", "1", "--eval-batches", "1",
                  "--num-workers", "0", "--image-size", "64")
IMAGENET_SMOKE_LMCL = IMAGENET_SMOKE + ("--neg_k", "16")
IMAGENET_SHORT = ("--epochs", str(IMAGENET_EPOCHS // 10))

# name, baseline arch, L-MCL arch, baseline top-1, L-MCL top-1
IMAGENET_HOMOGENEOUS = [
    ("ResNet-34", "resnet34_imagenet", "lmcl_resnet34_imagenet", 73.68, 75.12),
    ("ResNet-50", "resnet50_imagenet", "lmcl_resnet50_imagenet", 76.28, 78.35),
    ("ShuffleNetV2 1x", "ShuffleNetV2_1x_imagenet", "lmcl_ShuffleNetV2_1x_imagenet", 64.25, 65.91),
]
# (net1, net2) names in the factory's network order, L-MCL arch, (net1, net2) L-MCL top-1
IMAGENET_HETEROGENEOUS = [
    (("ResNet-18", "ShuffleNetV2 1x"), "lmcl_res18_shufflenetv2_1x_imagenet", (71.16, 66.06)),
    (("ShuffleNetV2 1x", "ResNet-50"), "lmcl_res50_shufflenetv2_1x_imagenet", (66.44, 76.57)),
    (("ResNet-18", "ResNet-50"), "lmcl_res18_res50_imagenet", (71.69, 77.34)),
]


def imagenet_baseline_row(name, arch, value):
    return Row(name=f"{name}, baseline", value=value, key="test/net/top1", workdir="mcl",
               argv=(IMAGENET_BASELINE_SCRIPT, "--arch", arch),
               match={"script": f"mcl/{IMAGENET_BASELINE_SCRIPT}", "arch": arch}, epochs=IMAGENET_EPOCHS,
               protocol="best", source=SOURCE, statistic="single number (runs not stated)", launcher="torchrun",
               scale_args={"smoke": IMAGENET_SMOKE, "short": IMAGENET_SHORT}, bench=("baseline", bench_arch(arch)))


def imagenet_lmcl_rows(name, arch, net, value):
    common = dict(value=value, workdir="mcl", argv=(IMAGENET_LMCL_SCRIPT, "--arch", arch),
                  match={"script": f"mcl/{IMAGENET_LMCL_SCRIPT}", "arch": arch}, epochs=IMAGENET_EPOCHS,
                  protocol="best", source=SOURCE, statistic="single number (runs not stated)", launcher="torchrun",
                  scale_args={"smoke": IMAGENET_SMOKE_LMCL, "short": IMAGENET_SHORT},
                  bench=("L-MCL", bench_arch(arch)))
    return [Row(name=f"{name}, L-MCL (net{net}, max over heads, as released)", key=f"test/net{net}/max_heads/top1",
                note="best epoch of the maximum top-1 over the network's 4 heads, as the released logs", **common),
            Row(name=f"{name}, L-MCL (net{net}, deployed head)", key=f"test/net{net}/top1",
                note="best epoch of the deployed backbone head; the README does not say which head it reports",
                **common)]


table10_rows = []
for name, base_arch, lmcl_arch, base, lmcl in IMAGENET_HOMOGENEOUS:
    table10_rows.append(imagenet_baseline_row(name, base_arch, base))
    table10_rows.extend(imagenet_lmcl_rows(name, lmcl_arch, 1, lmcl))
table10_rows.append(imagenet_baseline_row("ResNet-18", "resnet18_imagenet", 69.95))
for (name1, name2), arch, (v1, v2) in IMAGENET_HETEROGENEOUS:
    table10_rows.extend(imagenet_lmcl_rows(f"{name1} & {name2}: {name1}", arch, 1, v1))
    table10_rows.extend(imagenet_lmcl_rows(f"{name1} & {name2}: {name2}", arch, 2, v2))

TABLES = [
    Table(id="table8", title="L-MCL, CIFAR-100, homogeneous pairs (top-1 %)", source=SOURCE, rows=tuple(table8_rows)),
    Table(id="table9", title="L-MCL, CIFAR-100, heterogeneous pairs (top-1 %; baselines of the other networks in "
                             "table8)", source=SOURCE, rows=tuple(table9_rows)),
    Table(id="table10", title="L-MCL, ImageNet, homogeneous and heterogeneous pairs (top-1 %, torchrun, global "
                              "batch 256)", source=SOURCE, rows=tuple(table10_rows)),
]

def lmcl_row_names(table, name, net=1):
    return tuple((table, f"{name}, L-MCL (net{net}, {kind})") for kind in ("max over heads, as released",
                                                                          "deployed head"))


SMOKE = [
    Run(name="mcl baseline resnet32_cifar", workdir="mcl",
        argv=(BASELINE_SCRIPT, "--arch", "resnet32_cifar") + SMOKE_BASELINE, rows=(("table8", "ResNet-32, baseline"),)),
    Run(name="mcl L-MCL lmcl_resnet32_cifar (with a meta step)", workdir="mcl",
        argv=(LMCL_SCRIPT, "--arch", "lmcl_resnet32_cifar") + SMOKE_LMCL, rows=lmcl_row_names("table8", "ResNet-32")),
    Run(name="mcl ImageNet baseline ShuffleNetV2_1x_imagenet (torchrun, 2 processes)", workdir="mcl",
        argv=(IMAGENET_BASELINE_SCRIPT, "--arch", "ShuffleNetV2_1x_imagenet") + IMAGENET_SMOKE, dataset="imagenet",
        launcher="torchrun", nproc=2, rows=(("table10", "ShuffleNetV2 1x, baseline"),)),
    Run(name="mcl ImageNet L-MCL lmcl_ShuffleNetV2_1x_imagenet (torchrun, 2 processes, with a meta step)",
        workdir="mcl", argv=(IMAGENET_LMCL_SCRIPT, "--arch", "lmcl_ShuffleNetV2_1x_imagenet") + IMAGENET_SMOKE_LMCL,
        dataset="imagenet", launcher="torchrun", nproc=2, rows=lmcl_row_names("table10", "ShuffleNetV2 1x")),
]
