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
# name, script, extra flags, log key of the reported accuracy
METHODS = (("Baseline", "train.py", (), "test/net/top1"),
           ("DML", "train_DML.py", (), "test/mean/top1"),
           ("CL-ILR", "train_one.py", ("--avg", "--bpscale"), "test/mean/top1"),
           ("ONE", "train_one.py", (), "test/mean/top1"),
           ("OKDDip (branch)", "train_GL.py", (), "test/leader/top1"),
           ("OKDDip (network)", "train_GL.py", ("--MulStu",), "test/leader/top1"))
MATCH_FLAGS = {"--avg": "avg", "--bpscale": "bpscale", "--MulStu": "MulStu", "--ensemble": "ensemble",
               "--ind": "ind", "--type": "type"}
SMOKE_ARGS = ("--num_epochs", "1", "--steps-per-epoch", "2", "--eval-batches", "1", "--batch_size", "8",
              "--num_workers", "0", "--lr", "0.02")


def smoke_args(arch):
    small = {"resnet110": "resnet32", "wide_resnet20_8": "resnet32", "vgg16": "vgg16", "resnet34": "resnet34"}
    return SMOKE_ARGS + ("--model", small.get(arch, arch))


def row(name, value, key, script, dataset, arch, flags, epochs=300, schedule=(150, 225), launcher="python", **kw):
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
               protocol="best", launcher=launcher,
               scale_args={"smoke": smoke_args(arch), "short": short}, **kw)


def cifar_table(table_id, dataset, title):
    rows = []
    for arch_name, arch in ARCHS:
        for method, script, flags, key in METHODS:
            confirmed = dataset == "CIFAR100" and arch == "resnet32" and method == "OKDDip (branch)"
            extra = dict(value=25.65, metric="error", std=0.15, statistic="mean ± std over runs (count not stated)",
                         source="paper, CIFAR-100 table (quoted in DefangChen/OKDDip issue #1)") if confirmed else \
                dict(value=None, metric="error", source="paper", note="not transcribed")
            if arch == "densenetd40k12" and script in ("train_GL.py", "train_one.py") and "--MulStu" not in flags:
                extra["note"] = (extra.get("note", "") + "; released shared-block DenseNet branches "
                                 "(--densenet_shared_block 1)").lstrip("; ")
            rows.append(row(f"{arch_name} | {method}", key=key, script=script, dataset=dataset, arch=arch,
                            flags=flags, **extra))
    return Table(table_id, title, "Chen et al., Online Knowledge Distillation with Diverse Peers, AAAI 2020",
                 tuple(rows), seeds=(1, 2, 3))


IMAGENET_NOTE = ("the released code has no ImageNet recipe for these methods; standard ResNet-34 recipe "
                 "(90 epochs, lr x0.1 at 30/60, batch 256, wd 1e-4) with 8 processes; not transcribed")
IMAGENET_FLAGS = ("--batch_size", "256", "--wd", "1e-4", "--num_workers", "8")

TABLES = [
    cifar_table("table2", "CIFAR10", "CIFAR-10 top-1 error (%), best epoch, 4 students"),
    cifar_table("table3", "CIFAR100", "CIFAR-100 top-1 error (%), best epoch, 4 students"),
    Table("table4", "ImageNet ResNet-34 top-1 error (%)", "Chen et al., AAAI 2020", tuple(
        row(f"ResNet-34 | {method}", None, key, script, "imagenet", "resnet34", tuple(flags) + IMAGENET_FLAGS,
            epochs=90, schedule=(30, 60), launcher="torchrun", metric="error", source="paper", note=IMAGENET_NOTE)
        for method, script, flags, key in METHODS)),
    Table("table5", "CIFAR-100 ensembles with an equal number of learners (4), top-1 error (%) of the mean-logit "
          "ensemble", "Chen et al., AAAI 2020", tuple(
              row(f"ResNet-32 | {method} ensemble", None, "test/ensemble/top1", script, "CIFAR100", "resnet32", flags,
                  metric="error", source="paper", note="not transcribed")
              for method, script, flags in (("DML", "train_DML.py", ()), ("CL-ILR", "train_one.py", ("--avg", "--bpscale")),
                                            ("ONE", "train_one.py", ()),
                                            ("OKDDip (4 peers, no leader)", "train_GL.py", ("--ensemble",))))),
]

SMOKE = [
    Run("okddip baseline", W, ("train.py", "--dataset", "CIFAR10") + smoke_args("resnet32"), dataset="cifar10"),
    Run("okddip KD", W, ("train_kd.py", "--dataset", "CIFAR10", "--teacher_untrained") + smoke_args("resnet32"),
        dataset="cifar10"),
    Run("okddip DML", W, ("train_DML.py", "--dataset", "CIFAR100") + smoke_args("resnet32")),
    Run("okddip ONE", W, ("train_one.py", "--dataset", "CIFAR100") + smoke_args("resnet32")),
    Run("okddip CL-ILR", W, ("train_one.py", "--dataset", "CIFAR100", "--avg", "--bpscale") + smoke_args("resnet32")),
    Run("okddip ind", W, ("train_one.py", "--dataset", "CIFAR100", "--ind") + smoke_args("resnet32")),
    Run("okddip OKDDip branch", W, ("train_GL.py", "--dataset", "CIFAR100") + smoke_args("resnet32")),
    Run("okddip OKDDip network", W, ("train_GL.py", "--dataset", "CIFAR100", "--MulStu") + smoke_args("resnet32")),
    Run("okddip OKDDip ensemble", W, ("train_GL.py", "--dataset", "CIFAR100", "--ensemble") + smoke_args("resnet32")),
    Run("okddip OKDDip ImageNet torchrun", W, ("train_GL.py", "--dataset", "imagenet") + smoke_args("resnet34"),
        dataset="imagenet", launcher="torchrun", nproc=2),
]
