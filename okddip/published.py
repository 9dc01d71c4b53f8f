"""OKDDip's tables as data: the commands that reproduce each cell, and the published numbers the spec confirms.

Only one cell is confirmed (CIFAR-100, branch-based OKDDip, ResNet-32: error 25.65 +- 0.15, the paper's CIFAR-100
table as quoted in DefangChen/OKDDip issue #1); every other cell is "not transcribed" (value None).
Reported number per method (released selection): OKDDip -> the group leader at its best test epoch; ONE / CL-ILR /
DML -> the mean of the individual students' accuracies at the epoch where that mean is best; baseline -> best top-1;
ensemble table -> the peers' mean-logit ensemble.
"""
from common.results import Row, Run, Table

W = "okddip"
ARCHS = (("ResNet-32", "resnet32"), ("ResNet-110", "resnet110"), ("VGG-16", "vgg16"),
         ("DenseNet-40-12", "densenetd40k12"), ("WRN-20-8", "wide_resnet20_8"))
# name, script, extra flags, log key of the reported accuracy, okddip/bench.py case timing its step
METHODS = (("Baseline", "train.py", (), "test/net/top1", "baseline"),
           ("DML", "train_DML.py", (), "test/mean/top1", "dml"),
           ("CL-ILR", "train_one.py", ("--avg", "--bpscale"), "test/mean/top1", "cl-ilr"),
           ("ONE", "train_one.py", (), "test/mean/top1", "one"),
           ("OKDDip (branch)", "train_GL.py", (), "test/leader/top1", "okddip"),
           ("OKDDip (network)", "train_GL.py", ("--MulStu",), "test/leader/top1", "okddip-network"))
MATCH_FLAGS = {"--avg": "avg", "--bpscale": "bpscale", "--MulStu": "MulStu", "--ensemble": "ensemble",
               "--ind": "ind", "--type": "type"}
SMOKE_ARGS = ("--num_epochs", "1", "--steps-per-epoch", "2", "--eval-batches", "1", "--batch_size", "8",
              "--num_workers", "0", "--lr", "0.02")


def smoke_args(arch):
    small = {"resnet110": "resnet32", "wide_resnet20_8": "resnet32", "vgg16": "vgg16", "resnet34": "resnet34"}
    return SMOKE_ARGS + ("--model", small.get(arch, arch))


def row(name, value, key, script, dataset, arch, flags, bench, epochs=300, schedule=(150, 225), launcher="python",
        **kw):
    argv = (script, "--model", arch, "--dataset", dataset) + tuple(flags)
    if epochs != 300:
        argv += ("--num_epochs", str(epochs), "--schedule") + tuple(str(s) for s in schedule)
    match = {"script": f"okddip/{script}", "model": arch, "dataset": dataset}
    defaults = {"train_one.py": ("avg", "bpscale", "ind"), "train_GL.py": ("MulStu", "ensemble")}.get(script, ())
    match.update({k: False for k in defaults})
    match.update({MATCH_FLAGS[f]: True for f in flags if f in MATCH_FLAGS})
    short = ("--num_epochs", str(epochs // 10), "--schedule") + tuple(str(s // 10) for s in schedule)
    if script in ("train_GL.py", "train_one.py"):
        short += ("--length", "8")
    return Row(name=name, value=value, key=key, workdir=W, argv=argv, match=match, epochs=epochs,
               protocol="best", launcher=launcher, bench=(bench, arch),
               scale_args={"smoke": smoke_args(arch), "short": short}, **kw)


def cifar_table(table_id, dataset, title):
    rows = []
    for arch_name, arch in ARCHS:
        for method, script, flags, key, bench in METHODS:
            confirmed = dataset == "CIFAR100" and arch == "resnet32" and method == "OKDDip (branch)"
            extra = dict(value=25.65, metric="error", std=0.15, statistic="mean ± std over runs (count not stated)",
                         source="paper, CIFAR-100 table (quoted in DefangChen/OKDDip issue #1)") if confirmed else \
                dict(value=None, metric="error", source="paper", note="not transcribed")
            if arch == "densenetd40k12" and script in ("train_GL.py", "train_one.py") and "--MulStu" not in flags:
                extra["note"] = (extra.get("note", "") + "; released shared-block DenseNet branches "
                                 "(--densenet_shared_block 1)").lstrip("; ")
            rows.append(row(f"{arch_name} | {method}", key=key, script=script, dataset=dataset, arch=arch,
                            flags=flags, bench=bench, **extra))
    return Table(table_id, title, "Chen et al., Online Knowledge Distillation with Diverse Peers, AAAI 2020",
                 tuple(rows), seeds=(1, 2, 3))


IMAGENET_NOTE = ("the released code has no ImageNet recipe for these methods; standard ResNet-34 recipe "
                 "(90 epochs, lr x0.1 at 30/60, batch 256, wd 1e-4) with 8 processes; not transcribed")
IMAGENET_FLAGS = ("--batch_size", "256", "--wd", "1e-4", "--num_workers", "8")

# the same runs as the CIFAR-100 rows of DML, CL-ILR and ONE (their ensemble key), and OKDDip with 4 peers
ENSEMBLES = (("DML", "train_DML.py", (), "dml"), ("CL-ILR", "train_one.py", ("--avg", "--bpscale"), "cl-ilr"),
             ("ONE", "train_one.py", (), "one"),
             ("OKDDip (4 peers, no leader)", "train_GL.py", ("--ensemble",), "okddip-ensemble"))

TABLES = [
    cifar_table("table2", "CIFAR10", "CIFAR-10 top-1 error (%), best epoch, 4 students"),
    cifar_table("table3", "CIFAR100", "CIFAR-100 top-1 error (%), best epoch, 4 students"),
    Table("table4", "ImageNet ResNet-34 top-1 error (%)", "Chen et al., AAAI 2020", tuple(
        row(f"ResNet-34 | {method}", None, key, script, "imagenet", "resnet34", tuple(flags) + IMAGENET_FLAGS,
            bench, epochs=90, schedule=(30, 60), launcher="torchrun", metric="error", source="paper",
            note=IMAGENET_NOTE)
        for method, script, flags, key, bench in METHODS)),
    Table("table5", "CIFAR-100 ensembles with an equal number of learners (4), top-1 error (%) of the mean-logit "
          "ensemble", "Chen et al., AAAI 2020", tuple(
              row(f"ResNet-32 | {method} ensemble", None, "test/ensemble/top1", script, "CIFAR100", "resnet32", flags,
                  bench, metric="error", source="paper", note="not transcribed")
              for method, script, flags, bench in ENSEMBLES)),
]

# Each smoke run stands for the ResNet-32 (ImageNet: ResNet-34) rows whose command it runs at smoke scale; KD and the
# individual branches are in no table, so their smoke runs are run but not compared.
R32 = "ResNet-32 | "
SMOKE = [
    Run("okddip baseline", W, ("train.py", "--dataset", "CIFAR10") + smoke_args("resnet32"), dataset="cifar10",
        rows=(("table2", R32 + "Baseline"),)),
    Run("okddip KD", W, ("train_kd.py", "--dataset", "CIFAR10", "--teacher_untrained") + smoke_args("resnet32"),
        dataset="cifar10"),
    Run("okddip ind", W, ("train_one.py", "--dataset", "CIFAR100", "--ind") + smoke_args("resnet32")),
    Run("okddip DML", W, ("train_DML.py", "--dataset", "CIFAR100") + smoke_args("resnet32"),
        rows=(("table3", R32 + "DML"), ("table5", R32 + "DML ensemble"))),
    Run("okddip ONE", W, ("train_one.py", "--dataset", "CIFAR100") + smoke_args("resnet32"),
        rows=(("table3", R32 + "ONE"), ("table5", R32 + "ONE ensemble"))),
    Run("okddip CL-ILR", W, ("train_one.py", "--dataset", "CIFAR100", "--avg", "--bpscale") + smoke_args("resnet32"),
        rows=(("table3", R32 + "CL-ILR"), ("table5", R32 + "CL-ILR ensemble"))),
    Run("okddip OKDDip branch", W, ("train_GL.py", "--dataset", "CIFAR100") + smoke_args("resnet32"),
        rows=(("table3", R32 + "OKDDip (branch)"),)),
    Run("okddip OKDDip network", W, ("train_GL.py", "--dataset", "CIFAR100", "--MulStu") + smoke_args("resnet32"),
        rows=(("table3", R32 + "OKDDip (network)"),)),
    Run("okddip OKDDip ensemble", W, ("train_GL.py", "--dataset", "CIFAR100", "--ensemble") + smoke_args("resnet32"),
        rows=(("table5", R32 + "OKDDip (4 peers, no leader) ensemble"),)),
    Run("okddip OKDDip ImageNet torchrun", W, ("train_GL.py", "--dataset", "imagenet") + smoke_args("resnet34"),
        dataset="imagenet", launcher="torchrun", nproc=2, rows=(("table4", "ResNet-34 | OKDDip (branch)"),)),
]
