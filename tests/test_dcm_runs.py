"""dcm/main.py on the repository's spine: every method killed mid-run and resumed ends bit-identical to an
uninterrupted run, the run-folder rules hold for it, earlier checkpoints are refused, a missing dataset without a
network ends with its message, the in-place residual block changes no bit and allocates less, and the bench cases and
the published rows name each other."""
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from common.bench import allocated_mb
from common.cli import run_main
from common.fast import Fast
from common.logging import read_log
from common.loop import KILL_ENV
from common.options import RunFolderError
from dcm import bench, mobilenet, published, resnet
from dcm import main as dcm_main

from test_dcm import dcm_run, script_args

pytestmark = pytest.mark.usefixtures("one_thread")

DCM = pathlib.Path(dcm_main.__file__).resolve().parent
TIMES = ("epoch_time", "train_time", "test_time", "images_per_s")


def run_argv(root, run_dir, *extra):
    return ["--depth", "16", "--width", "0.5", "--batch_size", "8", "--nthread", "0", "--eval-batches", "1",
            "--data-root", str(root), "--run-dir", str(run_dir), "--seed", "1", "--quiet", "--device", "cpu",
            "--epochs", "3", "--steps-per-epoch", "2", "--epoch_step", "[2,3]", *extra]


def killed(argv, after_step):
    """dcm/main.py's main(ARGV) in a forked process that SIGKILLs itself right after its AFTER_STEP-th training step
    (common.loop's test hook, after any checkpoint due at that step); returns the exit code."""
    def target():
        os.environ[KILL_ENV] = str(after_step)
        dcm_main.main(argv)

    process = multiprocessing.get_context("fork").Process(target=target)
    process.start()
    process.join()
    return process.exitcode


def without_times(records):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in records]


def released_log(run_dir):
    """log.txt's records without their times and the run folder (`save`)."""
    records = [json.loads(line[len("json_stats: "):]) for line in (run_dir / "log.txt").read_text().splitlines()]
    assert all(r["save"] == str(run_dir) for r in records)
    return [{k: v for k, v in r.items() if k != "save"} for r in without_times(records)]


# 3 epochs of 2 steps, the lr dropping at the start of epochs 2 and 3 (a new SGD each time). DCM, with a checkpoint
# every step, is killed after global step 5 (the first of epoch 3): it resumes inside epoch 3, where on_epoch_start
# builds the drop's SGD from the freshly built optimizer's lr (0.1 x 0.2) and the checkpoint's optimizer must replace
# it (lr 0.004 and its momentum). DML (data on the device) is killed after step 3, resuming inside epoch 2; the
# baseline, without mid-epoch checkpoints, after step 3, resuming from the end of epoch 1.
METHODS = {
    "dcm": (["--method", "dcm", "--save-every-steps", "1"], 5, (2, 1)),
    "dml": (["--method", "dml", "--data-on-device", "--save-every-steps", "1"], 3, (1, 1)),
    "baseline": (["--method", "baseline", "--net2", "none"], 3, (1, None)),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_killed_and_resumed_run_is_bit_identical(method, synthetic_root, tmp_path):
    flags, kill_after, (epochs_done, step) = METHODS[method]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    dcm_main.main(run_argv(synthetic_root, straight, *flags))
    assert killed(run_argv(synthetic_root, interrupted, *flags), kill_after) == -9  # SIGKILL
    checkpoint = torch.load(interrupted / "checkpoint.pt", weights_only=False)
    assert checkpoint["epochs_done"] == epochs_done and (checkpoint["epoch_state"] or {}).get("step") == step
    assert not (interrupted / "finished").exists()
    dcm_main.main(run_argv(synthetic_root, interrupted, *flags, "--resume"))
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False)["run"] for d in (straight, interrupted))
    for na, nb in zip(a["nets"], b["nets"], strict=True):
        assert na.keys() == nb.keys() and all(torch.equal(na[k], nb[k]) for k in na)
    momentum = [[s["momentum_buffer"] for s in r["optimizer"]["state"].values()] for r in (a, b)]
    assert len(momentum[0]) == len(momentum[1]) > 0 and all(map(torch.equal, *momentum))
    assert a["best"] == b["best"]
    log = without_times(read_log(straight))
    assert log == without_times(read_log(interrupted)) and [r["epoch"] for r in log] == [1, 2, 3]
    assert [r["lr"] for r in log] == pytest.approx([0.1, 0.02, 0.004])
    assert released_log(straight) == released_log(interrupted) and len(released_log(interrupted)) == 3
    assert (interrupted / "finished").exists() and (interrupted / "epoch_end.pt").exists()


def test_run_folder_rules_and_earlier_checkpoints(synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    argv = run_argv(synthetic_root, run, "--method", "baseline", "--net2", "none", "--epochs", "1",
                    "--steps-per-epoch", "1")
    dcm_main.main(argv)
    with pytest.raises(RunFolderError, match="finished run"):  # no silent retraining over a finished run
        dcm_main.main(argv)
    (run / "finished").unlink()
    with pytest.raises(RunFolderError, match="--lr: the run has 0.1, this command has 0.05"):
        dcm_main.main(argv + ["--resume", "--lr", "0.05"])
    with pytest.raises(RunFolderError, match="--nthread"):  # the workers' seeds shape the augmentation
        dcm_main.main(argv + ["--resume", "--nthread", "1"])
    # A checkpoint of the scripts before the epoch driver, under a current args.json: refused, left as it was.
    torch.save({"format": "okd-checkpoint/1", "nets": [], "epoch": 1}, run / "checkpoint.pt")
    old_bytes = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(dcm_main.main, argv + ["--resume", "--print_freq", "5"])  # the print interval may change
    assert e.value.code == 1 and "earlier version" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == old_bytes
    assert json.loads((run / "resumes.jsonl").read_text().splitlines()[-1])["changed"] == {"print_freq": [20, 5]}
    # A folder written entirely by the earlier script (args.json without an identity): refused, untouched.
    old = tmp_path / "old"
    old.mkdir()
    (old / "args.json").write_text(json.dumps({"script": "dcm/main.py", "depth": 16, "epoch_step": [60, 120, 160]}))
    torch.save({"format": "okd-checkpoint/1", "nets": [], "epoch": 1}, old / "checkpoint.pt")
    with pytest.raises(SystemExit) as e:
        run_main(dcm_main.main, run_argv(synthetic_root, old, "--resume"))
    assert e.value.code == 1 and "earlier version" in capsys.readouterr().err
    assert sorted(p.name for p in old.iterdir()) == ["args.json", "checkpoint.pt"]


def test_no_dataset_and_no_network_ends_with_the_dataset_message(tmp_path):
    """`cd dcm && python main.py` on an empty data folder with no way out to the network (a proxy on a closed port):
    the DatasetNotFoundError text (folder, archive, flag), exit status 1, no traceback, no run folder left behind."""
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    env.pop("OKD_DEBUG", None)
    run_dir, data = tmp_path / "run", tmp_path / "data"
    result = subprocess.run([sys.executable, "main.py", "--dataroot", str(data), "--run-dir", str(run_dir),
                             "--depth", "16", "--width", "0.5"], cwd=DCM, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "urllib" not in result.stderr
    for part in (str(data / "cifar-100-python"), "cifar-100-python.tar.gz", "--dataroot"):
        assert part in result.stderr, (part, result.stderr)
    assert not run_dir.exists()


class OutOfPlaceFunctional:
    """torch.nn.functional with every ReLU out of place (as the modules were written before)."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def relu(x, inplace=False):
        return F.relu(x)


def out_of_place_block(self, x):
    o1 = F.relu(self.bn0(x))
    y = self.conv0(o1)
    o2 = F.relu(self.bn1(y))
    return self.conv1(o2) + (self.convdim(o1) if self.convdim is not None else x)


@pytest.mark.parametrize("net2,method", [("wrn", "dcm"), ("mobilenet", "dml")])
def test_in_place_blocks_change_no_bit_and_allocate_less(net2, method, monkeypatch):
    """Three SGD steps of the script's DCMRun with the in-place ReLUs and residual add and with the former
    out-of-place forwards (WRN pair with every aux head; WRN | MobileNet): the same weights, BN statistics, momentum
    and logged values to the bit; the in-place step asks the allocator for less memory."""
    args = script_args("--depth", "16", "--width", "0.5", "--net2", net2, "--method", method)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 100, (4,), generator=g)) for _ in range(3)]

    def trained():
        run = dcm_run(args, dcm_main.build_networks(args, 100))
        run.on_epoch_start(0)
        values = [run.train_step(0, x, y) for x, y in batches[:2]]
        mb = allocated_mb(lambda: values.append(run.train_step(0, *batches[2])))
        return run.state_dict(), values, mb

    new = trained()
    with monkeypatch.context() as m:
        for module in (resnet, mobilenet):
            m.setattr(module, "F", OutOfPlaceFunctional())
        m.setattr(resnet.Block, "forward", out_of_place_block)
        old = trained()
    for a, b in zip(new[0]["nets"], old[0]["nets"], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(s["momentum_buffer"], t["momentum_buffer"])
               for s, t in zip(new[0]["optimizer"]["state"].values(), old[0]["optimizer"]["state"].values()))
    assert [{k: v.item() for k, v in r.items()} for r in new[1]] == [{k: v.item() for k, v in r.items()}
                                                                      for r in old[1]]
    assert new[2] < old[2], (new[2], old[2])


@pytest.mark.parametrize("ni,no,stride", [(8, 8, 1), (8, 16, 2)], ids=["identity", "projection"])
def test_residual_block_never_writes_into_its_input(ni, no, stride):
    torch.manual_seed(0)
    block = resnet.Block(ni, no, stride)
    leaf = torch.randn(2, ni, 8, 8, requires_grad=True)
    x = leaf * 1.0  # a block's input is another block's output: autograd saved it, the caller still uses it
    kept, version = x.detach().clone(), x._version
    out = block(x)
    out.sum().backward()
    assert x._version == version and torch.equal(x, kept)
    with torch.no_grad():
        assert torch.equal(out, out_of_place_block(block, x))


def test_bench_cases_cover_both_sizes_and_every_column_and_build_the_trained_step():
    cases = {(c.method, c.arch): c for c in bench.CASES}
    assert set(cases) == {(m, a) for w in ("wrn-16-2", "wrn-28-10") for m, a in (
        ("dcm", f"{w}|{w}"), ("dml", f"{w}|{w}"), ("baseline", w), ("dcm", f"{w}|mobilenet"),
        ("dml", f"{w}|mobilenet"), ("baseline", f"{w}|mobilenet"))}
    built = cases[("dcm", "wrn-16-2|wrn-16-2")].build(fast=Fast(), batch=2)
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2,))
    net1 = built.models[0]
    assert (net1.depth, net1.width, sum(p.numel() for p in built.deployed.parameters())) == (
        16, 2, sum(p.numel() for p in net1.deployed_parameters()))
    with torch.no_grad():  # the deployed network is net 1's main path, with its weights
        assert torch.equal(built.deployed.eval()(x)[0], net1.eval()(x)[2])
    net1.train()
    before = [p.detach().clone() for p in net1.parameters()]
    values = built.step(x, y)
    assert sum(k.startswith("kl/") for k in values) == 18 and sum(k.startswith("ce/") for k in values) == 6
    assert all(not torch.equal(p, b) for p, b in zip(net1.parameters(), before))  # one SGD step over every tensor


def test_every_table_row_names_its_bench_case_and_every_smoke_run_its_rows():
    cases = {(c.method, c.arch) for c in bench.CASES}
    rows = {(t.id, r.name): r for t in published.TABLES for r in t.rows}
    assert all(r.bench in cases for r in rows.values()), [n for n, r in rows.items() if r.bench not in cases]
    covered = [key for run in published.SMOKE for key in run.rows]
    assert sorted(covered) == sorted(rows)  # every row is exercised by exactly one smoke run

    def command(argv):
        return argv[0], argv[argv.index("--net2") + 1], argv[argv.index("--method") + 1]
    for run in published.SMOKE:  # a smoke run stands only for rows of its own command
        assert all(command(rows[key].argv) == command(run.argv) for key in run.rows), run.name
