"""FFSD on the repository's spine: a run killed mid-epoch (or at an epoch boundary) and resumed ends bit-identical to
an uninterrupted one, the run-folder rules hold for cifar.py, bad values are parser errors, the device follows the
authors' --gpu_ids, the in-place ReLUs and residual adds change no bit and allocate less, and every table row names
its bench case and every smoke run its rows."""
import json
import multiprocessing
import os

import pytest
import torch
import torch.nn.functional as F

from common.bench import allocated_mb
from common.cli import run_main
from common.fast import Fast
from common.logging import read_log
from common.loop import KILL_ENV
from common.meters import Meter
from common.options import RunFolderError, detached_setup
from conftest import assert_same_training_with_less_memory
from ffsd import bench, published
from ffsd.models import resnet, wideresnet
from ffsd.options import device_of, get_args_parser
from ffsd.train import FFSDRun, main
from ffsd.training import build_networks

TIMES = ("epoch_time", "train_time", "images_per_s")


pytestmark = pytest.mark.usefixtures("one_thread")


def argv(root, run_dir, *extra):
    """2 epochs (--n_epochs 3 is exclusive) of 3 steps, a checkpoint every 2 steps, the authors' print every step."""
    return ["--model", "resnet20", "--data-root", str(root), "--run-dir", str(run_dir), "--n_epochs", "3",
            "--steps-per-epoch", "3", "--eval-batches", "1", "--train_batch_size", "4", "--test_batch_size", "8",
            "--workers", "0", "--lr", "0.02", "--seed", "1", "--quiet", "--save-every-steps", "2",
            "--print_every", "1", *extra]


def killed(argv, after_step, dataset="cifar100"):
    """main(ARGV) in a forked process that SIGKILLs itself right after its AFTER_STEP-th training step (common.loop's
    test hook, after any checkpoint due at that step); returns the exit code."""
    def target():
        os.environ[KILL_ENV] = str(after_step)
        main(argv, dataset)

    process = multiprocessing.get_context("fork").Process(target=target)
    process.start()
    process.join()
    return process.exitcode


def without_times(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in read_log(str(run_dir))]


def equal(a, b):
    """A and B (nested dicts, lists and tensors) hold the same values, tensors to the bit."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(equal, a, b))
    return a == b


def assert_same_run(straight, interrupted):
    """The same state (all six networks, the six optimizers and their schedulers, the best values), log.jsonl
    (minus times) and authors' best-model files."""
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False)["run"] for d in (straight, interrupted))
    assert list(a) == ["networks", "best", "optimizers", "schedulers"] and equal(a, b)
    assert without_times(straight) == without_times(interrupted)
    for name in ("modelleader_best.pth", "model1_best.pth", "modelfusion_best.pth"):
        files = [torch.load(d / "checkpoints" / name, weights_only=False) for d in (straight, interrupted)]
        assert equal(files[0], files[1])
    assert (interrupted / "finished").exists() and (interrupted / "epoch_end.pt").exists()


@pytest.fixture(scope="module")
def straight(synthetic_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ffsd_straight") / "run"
    main(argv(synthetic_root, run_dir))
    return run_dir


# Killed after global step 5 (the second of epoch 2, with the mid-epoch checkpoint due then) the run resumes inside
# epoch 2 at step 2; killed after step 4 (the first of epoch 2, no checkpoint due) it resumes from the end of epoch 1.
@pytest.mark.parametrize("after_step,epoch_step", [(5, 2), (4, None)], ids=["mid-epoch", "epoch-boundary"])
def test_killed_and_resumed_run_is_bit_identical(after_step, epoch_step, straight, synthetic_root, tmp_path):
    interrupted = tmp_path / "interrupted"
    assert killed(argv(synthetic_root, interrupted), after_step) == -9  # SIGKILL
    checkpoint = torch.load(interrupted / "checkpoint.pt", weights_only=False)
    assert checkpoint["epochs_done"] == 1 and (checkpoint["epoch_state"] or {}).get("step") == epoch_step
    main(argv(synthetic_root, interrupted, "--continue_train"))  # the authors' flag for --resume
    assert_same_run(straight, interrupted)
    log = without_times(straight)
    assert [r["epoch"] for r in log] == [1, 2] and log[0]["lambda/fusion"] == pytest.approx(10 * 0.0407622, rel=1e-6)
    lines = (straight / "logger.log").read_text()
    assert lines.count("Epoch[2] (4/") == 1 and "\tAccuracy " in lines and "Best Models: Epoch" in lines


@pytest.mark.slow  # ResNet-18 at 224 px
def test_imagenet_killed_and_resumed_run_is_bit_identical(synthetic_root, tmp_path):
    """imagenet.py killed inside its first epoch: the per-iteration lr rule and its warm-up (set before each step)
    continue exactly."""
    flags = ["--model", "resnet18", "--train_batch_size", "2", "--test_batch_size", "2", "--n_epochs", "2",
             "--data-root", str(synthetic_root / "imagenet"), "--steps-per-epoch", "2", "--save-every-steps", "1"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    main(argv(synthetic_root, straight) + flags, "imagenet")
    assert killed(argv(synthetic_root, interrupted) + flags, 1, "imagenet") == -9
    checkpoint = torch.load(interrupted / "checkpoint.pt", weights_only=False)
    assert checkpoint["epochs_done"] == 0 and checkpoint["epoch_state"]["step"] == 1
    main(argv(synthetic_root, interrupted, "--resume") + flags, "imagenet")
    assert_same_run(straight, interrupted)
    assert read_log(str(straight))[0]["lr"] < 0.1  # inside the warm-up


def test_run_folder_rules(straight, synthetic_root, tmp_path, capsys):
    with pytest.raises(RunFolderError, match="finished run"):  # no silent retraining over a finished run
        main(argv(synthetic_root, straight))
    with pytest.raises(SystemExit) as e:  # --resume on it: nothing to do
        main(argv(synthetic_root, straight, "--resume"))
    assert e.value.code == 0 and "finished already" in capsys.readouterr().out
    with pytest.raises(RunFolderError, match="--lr: the run has 0.02, this command has 0.5"):
        main(argv(synthetic_root, straight, "--resume", "--lr", "0.5"))
    with pytest.raises(RunFolderError, match="--n_epochs: the run has 3, this command has 4"):
        main(argv(synthetic_root, straight, "--resume", "--n_epochs", "4"))
    # a folder written before the epoch driver (args.json without an identity, an okd-checkpoint/1) is refused as is
    old = tmp_path / "old"
    old.mkdir()
    (old / "args.json").write_text(json.dumps({"script": "ffsd/cifar.py", "lr": 0.02}))
    torch.save({"format": "okd-checkpoint/1", "networks": {}}, old / "checkpoint.pt")
    with pytest.raises(SystemExit) as e:
        run_main(main, argv(synthetic_root, old, "--resume"))
    assert e.value.code == 1 and "earlier version" in capsys.readouterr().err
    assert sorted(p.name for p in old.iterdir()) == ["args.json", "checkpoint.pt"]


def test_an_interrupted_run_resumes_only_with_its_own_settings(synthetic_root, tmp_path):
    """A change of the training math is refused; what may change on resume (the folder's name, the print interval,
    the display options) is recorded in resumes.jsonl, and args.json keeps how the run started."""
    run_dir = tmp_path / "run"
    assert killed(argv(synthetic_root, run_dir), 2) == -9
    with pytest.raises(RunFolderError, match="--temperature: the run has 2, this command has 3.0"):
        main(argv(synthetic_root, run_dir, "--resume", "--temperature", "3"))
    main(argv(synthetic_root, run_dir, "--resume", "--print_every", "2", "--name", "other", "--display_id", "0"))
    changed = json.loads((run_dir / "resumes.jsonl").read_text().splitlines()[-1])["changed"]
    assert changed["print_every"] == [1, 2] and changed["name"] == ["default", "other"]
    assert json.loads((run_dir / "args.json").read_text())["print_every"] == 1  # how the run was started


def test_bad_values_are_parser_errors(synthetic_root, tmp_path, capsys):
    def error(*flags, dataset="cifar100"):
        with pytest.raises(SystemExit) as e:
            main(["--data-root", str(synthetic_root), "--run-dir", str(tmp_path / "bad"), *flags], dataset)
        assert e.value.code == 2
        return capsys.readouterr().err
    assert "--lr must be positive; got -0.1" in error("--lr", "-0.1")
    assert "--train_batch_size must be positive" in error("--train_batch_size", "0")
    assert "--weight_decay must be >= 0" in error("--weight_decay=-1e-4")
    assert "leave no epoch to train" in error("--start_epoch", "5", "--n_epochs", "5")
    assert "--gpu_ids 'a'" in error("--gpu_ids", "a")
    assert "--data-on-device keeps CIFAR" in error("--data-on-device", dataset="imagenet")
    assert "exceeds the" in error("--dataroot", str(synthetic_root / "imagenet"), "--train_batch_size", "4096",
                                  "--test_batch_size", "4", dataset="imagenet")
    assert not (tmp_path / "bad").exists()  # nothing written before the options are valid


def test_device_follows_gpu_ids_and_data_root_its_default(monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))  # read when the parser is built
    parse = get_args_parser().parse_args
    assert parse([]).data_root == str(tmp_path) and parse(["--dataroot", "x"]).data_root == "x"
    assert device_of(parse(["--gpu_ids", "-1"])) == "cpu"
    assert device_of(parse(["--gpu_ids", "-1", "--device", "cuda:1"])) == "cuda:1"
    assert device_of(parse([])) == ("cuda:0" if torch.cuda.is_available() else "cpu")
    fast = Fast.from_args(parse(["--fast", "--gpu_ids", "-1"]), device_of(parse(["--gpu_ids", "-1"])))
    assert (fast.data_on_device, fast.amp, fast.channels_last, fast.compile) == (False, "none", True, False)
    imagenet = get_args_parser("imagenet").parse_args([])
    assert (imagenet.n_epochs, imagenet.lr_decay_iters, imagenet.train_batch_size, imagenet.model) == \
        (90, [30, 60, 80], 256, "resnet18")


def basic_block_out_of_place(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(out + shortcut)


def wide_basic_out_of_place(self, x):
    out = self.dropout(self.conv1(F.relu(self.bn1(x))))
    out = self.conv2(F.relu(self.bn2(out)))
    return out + self.shortcut(x)


def out_of_place(monkeypatch):
    """The ReLUs and residual adds as they were written before: a fresh tensor each."""
    relu = F.relu
    monkeypatch.setattr(F, "relu", lambda x, inplace=False: relu(x))
    monkeypatch.setattr(resnet.BasicBlock, "forward", basic_block_out_of_place)
    monkeypatch.setattr(wideresnet.WideBasic, "forward", wide_basic_out_of_place)


@pytest.mark.parametrize("model", ["resnet20", "wideresnet1602", "densenet"])
def test_in_place_activations_change_no_bit_and_allocate_less(model, monkeypatch):
    """Two FFSD iterations (all six networks, their optimizers, the decoders in both modes) with the in-place ReLUs
    and residual adds and with the former out-of-place ones: the same weights, BN statistics and loss terms to the
    bit; the in-place iteration asks the allocator for less memory."""
    def trained():
        args = get_args_parser().parse_args(["--model", model])
        torch.manual_seed(0)
        nets = build_networks(model)
        run = FFSDRun(detached_setup(Fast()), args, nets)
        run.on_epoch_start(6)
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 100, (2,), generator=g))
                   for _ in range(2)]
        meter = Meter()
        meter.update(run.train_step(0, *batches[0]), 2)
        mb = allocated_mb(lambda: meter.update(run.train_step(1, *batches[1]), 2))
        return nets.state_dict(), meter.per_batch(), mb

    new = trained()
    with monkeypatch.context() as patch:
        out_of_place(patch)
        old = trained()
    assert_same_training_with_less_memory(new, old)


def test_every_table_row_names_its_bench_case_and_every_smoke_run_its_rows():
    cases = {(c.method, c.arch) for c in bench.CASES}
    rows = {(t.id, r.name): r for t in published.TABLES for r in t.rows}
    assert all(r.bench in cases for r in rows.values()), [n for n, r in rows.items() if r.bench not in cases]
    for run in published.SMOKE:
        assert run.rows and all(key in rows for key in run.rows), run.name
        for key in run.rows:  # a smoke run stands only for rows of its own script and architecture
            row = rows[key]
            assert (row.argv[0], row.match["model"]) == (run.argv[0], run.argv[run.argv.index("--model") + 1])
