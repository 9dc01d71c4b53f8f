"""OKDDip on the repository's spine: every method killed mid-run and resumed ends bit-identical to an uninterrupted
run, the run-folder rules hold for these scripts, DDP looks for unused parameters only where a method leaves some,
the loader workers never outnumber the cores, the in-place residual add changes no bit and allocates less, and
every table row names its bench case and every smoke run its rows."""
import importlib
import json
import multiprocessing
import os

import pytest
import torch

from common.bench import allocated_mb
from common.cli import run_main
from common.fast import Fast
from common.logging import read_log
from common.loop import KILL_ENV
from common.meters import Meter
from common.options import RunFolderError, detached_setup
from conftest import assert_same_training_with_less_memory
from okddip import bench, engine, published, train, train_GL
from okddip.engine import RecipeRun
from okddip.models import resnet

pytestmark = pytest.mark.usefixtures("one_thread")


TIMES = ("epoch_time", "train_time", "images_per_s")


def _argv(root, run_dir, *extra, dataset="CIFAR100"):
    return ["--dataset", dataset, "--data-root", str(root), "--run-dir", str(run_dir), "--num_epochs", "2",
            "--steps-per-epoch", "3", "--eval-batches", "1", "--batch_size", "8", "--num_workers", "0",
            "--lr", "0.02", "--seed", "1", "--quiet", "--save-every-steps", "2", *extra]


def _killed(main, argv, after_step):
    """MAIN(ARGV) in a forked process that SIGKILLs itself right after its AFTER_STEP-th training step (common.loop's
    test hook, after any checkpoint due at that step); returns the exit code."""
    def target():
        os.environ[KILL_ENV] = str(after_step)
        main(argv)

    process = multiprocessing.get_context("fork").Process(target=target)
    process.start()
    process.join()
    return process.exitcode


def _without_times(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in read_log(str(run_dir))]


# 3 steps per epoch, a checkpoint every 2 steps. Killed after global step 6 (the last step of epoch 2, one step after
# its mid-epoch checkpoint) the run resumes inside epoch 2; killed after step 4 (the first of epoch 2) it resumes
# from the end of epoch 1.
METHODS = {
    "baseline": ("train", ["--dataset", "CIFAR10"], 6, "test/net/top1"),
    "kd": ("train_kd", ["--dataset", "CIFAR10", "--T_model", "resnet32", "--teacher_untrained"], 4,
           "train/teacher_loss"),
    "dml": ("train_DML", ["--num_branches", "2"], 6, "test/net1/top1"),
    "one": ("train_one", ["--num_branches", "3"], 6, "test/gated/top1"),
    "cl-ilr": ("train_one", ["--num_branches", "3", "--avg", "--bpscale"], 4, "train/kl/branch2"),
    "okddip": ("train_GL", ["--num_branches", "3"], 6, "train/attention_self"),
    "okddip-network": ("train_GL", ["--num_branches", "3", "--MulStu"], 4, "train/kl/leader"),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_killed_and_resumed_run_is_bit_identical(name, synthetic_root, tmp_path):
    script, flags, kill_after, key = METHODS[name]
    main = importlib.import_module(f"okddip.{script}").main
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    main(_argv(synthetic_root, straight, *flags))
    assert _killed(main, _argv(synthetic_root, interrupted, *flags), kill_after) == -9  # SIGKILL
    checkpoint = torch.load(interrupted / "checkpoint.pt", weights_only=False)
    assert checkpoint["epochs_done"] == 1 and not (interrupted / "finished").exists()
    assert (checkpoint["epoch_state"] or {}).get("step") == (2 if kill_after == 6 else None)
    main(_argv(synthetic_root, interrupted, *flags, "--resume"))
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False)["run"] for d in (straight, interrupted))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["best"] == b["best"]
    log = _without_times(straight)
    assert log == _without_times(interrupted) and [r["epoch"] for r in log] == [1, 2] and key in log[-1]
    for f in ("epoch_end.pt", "last.pth", "best.pth", "test_best_metrics.json", "parameters.json", "finished"):
        assert (interrupted / f).exists(), f
    released = [torch.load(d / "last.pth", weights_only=False)["state_dict"] for d in (straight, interrupted)]
    assert all(torch.equal(released[0][k], released[1][k]) for k in released[0])


def test_run_folder_refuses_reuse_other_settings_and_earlier_versions(synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["--num_epochs", "1", "--steps-per-epoch", "1", "--num_branches", "3"]
    train_GL.main(_argv(synthetic_root, run, *tiny))
    with pytest.raises(RunFolderError, match="finished run"):  # no silent retraining over a finished run
        train_GL.main(_argv(synthetic_root, run, *tiny))
    with pytest.raises(SystemExit) as e:  # --resume on it: nothing to do
        train_GL.main(_argv(synthetic_root, run, *tiny, "--resume"))
    assert e.value.code == 0 and "finished already" in capsys.readouterr().out
    (run / "finished").unlink()
    with pytest.raises(RunFolderError, match="--lr: the run has 0.02, this command has 0.05"):
        train_GL.main(_argv(synthetic_root, run, *tiny, "--resume", "--lr", "0.05"))
    train_GL.main(_argv(synthetic_root, run, *tiny, "--resume", "--version", "V1"))  # names a folder only: allowed
    assert json.loads((run / "resumes.jsonl").read_text().splitlines()[-1])["changed"]["version"] == ["V0", "V1"]
    # a folder written by the scripts before the epoch driver (args.json without an identity) is refused, untouched
    old = tmp_path / "old"
    old.mkdir()
    (old / "args.json").write_text(json.dumps({"script": "okddip/train_GL.py", "lr": 0.02}))
    torch.save({"format": "okd-checkpoint/1", "model": {}}, old / "checkpoint.pt")
    with pytest.raises(SystemExit) as e:
        run_main(train_GL.main, _argv(synthetic_root, old, *tiny, "--resume"))
    assert e.value.code == 1 and "earlier version" in capsys.readouterr().err
    assert sorted(p.name for p in old.iterdir()) == ["args.json", "checkpoint.pt"]


# script, flags, parameters the method leaves without gradient
GRADIENTS = [("train", [], set()), ("train_kd", ["--T_model", "resnet32"], set()), ("train_DML", [], set()),
             ("train_one", [], set()), ("train_one", ["--avg", "--bpscale"], set()),
             ("train_one", ["--ind"], {"control_v1.weight", "control_v1.bias", "bn_v1.weight", "bn_v1.bias"}),
             ("train_one", ["--ind", "--avg"], set()), ("train_GL", [], set()), ("train_GL", ["--MulStu"], set()),
             ("train_GL", ["--ensemble"], set()), ("train_GL", ["--model", "densenetd40k12"], set()),
             ("train_one", ["--model", "densenetd40k12"], set())]


@pytest.mark.parametrize("script,flags,unused", GRADIENTS)
def test_ddp_looks_for_unused_parameters_only_where_the_method_leaves_some(script, flags, unused, monkeypatch):
    """DDP with find_unused_parameters=False fails on a parameter without gradient, and with True warns in every
    run that has none: the Method says which it is, and the RecipeRun tells DDP."""
    module = importlib.import_module(f"okddip.{script}")
    branches = [] if script in ("train", "train_kd") else ["--num_branches", "3"]
    args = module.get_args_parser().parse_args(branches + flags)
    wrapped = {}
    monkeypatch.setattr(engine, "wrap_ddp", lambda model, ctx, **kw: wrapped.update(kw) or model)
    if script == "train_kd":
        from okddip.models import plain_network
        method = module.build(args, 10, plain_network("resnet32", 10).eval())
    else:
        method = module.build(args, 10)
    run = RecipeRun(detached_setup(Fast()), args, method)
    run.on_epoch_start(100)
    run.train_step(0, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert {n for n, p in method.model.named_parameters() if p.grad is None} == unused
    assert method.unused_parameters == bool(unused) == wrapped["find_unused_parameters"]


def test_default_loader_workers_never_outnumber_the_cores(monkeypatch):
    from common import options
    monkeypatch.setattr(options.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert train.get_args_parser().parse_args([]).num_workers == 2
    monkeypatch.setattr(options.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert train.get_args_parser().parse_args([]).num_workers == 8  # the released default


def _out_of_place(block):
    """The residual block's forward as it was written before: a fresh tensor for the sum."""
    def forward(x):
        out = block.relu(block.bn1(block.conv1(x)))
        if isinstance(block, resnet.Bottleneck):
            out = block.relu(block.bn2(block.conv2(out)))
            out = block.bn3(block.conv3(out))
        else:
            out = block.bn2(block.conv2(out))
        identity = x if block.downsample is None else block.downsample(x)
        return block.relu(out + identity)
    return forward


@pytest.mark.parametrize("arch,script,flags", [("resnet32", train, []), ("resnet32", train_GL, ["--num_branches", "3"]),
                                              ("resnet110", train, [])], ids=["basic", "basic-okddip", "bottleneck"])
def test_in_place_residual_add_changes_no_bit_and_allocates_less(arch, script, flags):
    """Three SGD steps with the in-place residual add and with the former out-of-place one (BasicBlock: ResNet-32,
    the baseline and branch-based OKDDip; Bottleneck: ResNet-110): the same weights, BN statistics and logged values
    to the bit; the in-place step asks the allocator for less memory."""
    def trained(out_of_place):
        args = script.get_args_parser().parse_args(["--model", arch] + flags)
        torch.manual_seed(0)
        method = script.build(args, 10)
        if out_of_place:
            for m in method.model.modules():
                if isinstance(m, (resnet.BasicBlock, resnet.Bottleneck)):
                    m.forward = _out_of_place(m)
        run = RecipeRun(detached_setup(Fast()), args, method)
        run.on_epoch_start(100)
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
        meter = Meter()
        for x, y in batches[:2]:
            meter.update(run.train_step(0, x, y), 4)
        mb = allocated_mb(lambda: meter.update(run.train_step(0, *batches[2]), 4))
        return method.model.state_dict(), meter.per_batch(), mb

    new, old = trained(False), trained(True)
    assert_same_training_with_less_memory(new, old)


def test_every_table_row_names_its_bench_case_and_every_smoke_run_its_rows():
    cases = {(c.method, c.arch) for c in bench.CASES}
    rows = {(t.id, r.name): r for t in published.TABLES for r in t.rows}
    assert all(r.bench in cases for r in rows.values()), [n for n, r in rows.items() if r.bench not in cases]
    method_flags = lambda argv: {a for a in argv if a in published.MATCH_FLAGS}
    for run in published.SMOKE:
        assert all(key in rows for key in run.rows), run.name
        dataset = run.argv[run.argv.index("--dataset") + 1]
        for key in run.rows:  # a smoke run stands only for rows of its own script, dataset and method flags
            row = rows[key]
            assert (row.argv[0], row.match["dataset"], method_flags(row.argv)) == \
                (run.argv[0], dataset, method_flags(run.argv)), (run.name, key)
