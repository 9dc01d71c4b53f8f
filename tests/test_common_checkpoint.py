"""Checkpoints and the epoch driver, through tests/tiny_train.py (a script on the same spine as every paper's)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from common.checkpoint import CheckpointError, load_checkpoint, load_state_dict_checked, save_checkpoint
from common.logging import FiniteGuard
from common.loop import KILL_ENV

TINY = os.path.join(os.path.dirname(__file__), "tiny_train.py")


def _train(data_root, run_dir, *extra, kill_after=None, check=True):
    env = dict(os.environ)
    env.pop(KILL_ENV, None)
    if kill_after:
        env[KILL_ENV] = str(kill_after)
    proc = subprocess.run([sys.executable, TINY, "--data-root", str(data_root), "--run-dir", str(run_dir),
                           "--epochs", "2", "--quiet", *extra], env=env, capture_output=True, text=True)
    if check and kill_after is None:
        assert proc.returncode == 0, proc.stderr
    return proc


def _weights(run_dir, name="checkpoint.pt"):
    return torch.load(os.path.join(run_dir, name), weights_only=False)["run"]["net"]


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _log_without_times(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith(("_time", "images_per_s"))} for line in f]


@pytest.mark.parametrize("workers,save_every", [(0, 0), (2, 5)])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(synthetic_root, tmp_path, workers, save_every):
    """19 steps per epoch; the run is killed after its 27th step (inside epoch 2) and resumed."""
    opts = ["--workers", str(workers), "--save-every-steps", str(save_every)]
    _train(synthetic_root, tmp_path / "straight", *opts)
    killed = _train(synthetic_root, tmp_path / "killed", *opts, kill_after=27)
    assert killed.returncode == -9  # SIGKILL
    assert not os.path.exists(tmp_path / "killed" / "finished")
    resumed = _train(synthetic_root, tmp_path / "killed", *opts, "--resume")
    assert ("after 1 epoch(s) and 5 step(s)" if save_every else "after 1 epoch(s)") in resumed.stdout
    _assert_identical(_weights(tmp_path / "straight"), _weights(tmp_path / "killed"))
    assert _log_without_times(tmp_path / "straight") == _log_without_times(tmp_path / "killed")
    # the last completed epoch is kept beside the latest checkpoint
    _assert_identical(_weights(tmp_path / "killed"), _weights(tmp_path / "killed", "epoch_end.pt"))


def test_nan_stop_says_what_each_kept_checkpoint_holds(synthetic_root, tmp_path):
    """The loss is NaN from global step 23 (epoch 2, step 4) on; a checkpoint is due after every step."""
    proc = _train(synthetic_root, tmp_path / "run", "--nan-at-step", "23", "--save-every-steps", "1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    msg = proc.stderr
    assert "NaN or inf at epoch 2, step 4" in msg
    assert "checkpoint.pt holds epoch 2 after step 3" in msg and "may already be diverging" in msg
    assert "epoch_end.pt holds the end of epoch 1, the last completed epoch" in msg
    latest = load_checkpoint(os.path.join(tmp_path, "run", "checkpoint.pt"))
    assert latest["epochs_done"] == 1 and latest["epoch_state"]["step"] == 3
    completed = load_checkpoint(os.path.join(tmp_path, "run", "epoch_end.pt"))
    assert completed["epochs_done"] == 1 and completed["epoch_state"] is None
    for state in (latest, completed):
        assert all(torch.isfinite(v).all() for v in state["run"]["net"].values() if v.is_floating_point())


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    path = tmp_path / "ck.pt"
    state = {"net": {"w": torch.randn(4, 4)}, "epoch": 3, "best": 71.5}
    save_checkpoint(path, state, meta={"arch": "resnet32"})
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind
    loaded = load_checkpoint(path, expect_meta={"arch": "resnet32"})
    assert loaded["epoch"] == 3 and torch.equal(loaded["net"]["w"], state["net"]["w"])
    assert torch.equal(loaded["rng"]["torch"], torch.get_rng_state())


def _corrupt_cases(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"net": {"w": torch.randn(256, 256)}, "epoch": 1}, meta={"arch": "a"})
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    bitflip = tmp_path / "bitflip.pt"
    bitflip.write_bytes(bytes(flipped))
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.ones(2)}, foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    earlier = tmp_path / "earlier.pt"
    torch.save({"format": "okd-checkpoint/1", "model": {}, "epoch": 1}, earlier)
    return good, [truncated, bitflip, foreign, garbage, earlier]


def test_bad_checkpoints_are_refused_and_nothing_is_overwritten(tmp_path):
    good, bad = _corrupt_cases(tmp_path)
    for path in bad:
        before = path.read_bytes()
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert str(path) in str(e.value)
        assert path.read_bytes() == before
    with pytest.raises(CheckpointError, match="earlier version of this repository"):
        load_checkpoint(bad[-1])
    with pytest.raises(CheckpointError, match="arch: checkpoint has 'a', this run has 'b'"):
        load_checkpoint(good, expect_meta={"arch": "b"})
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_resume_from_corrupt_checkpoint_fails_without_touching_the_run(synthetic_root, tmp_path):
    run = tmp_path / "run"
    _train(synthetic_root, run, "--epochs", "1")
    os.remove(run / "finished")  # as if killed right after its last checkpoint
    ckpt = run / "checkpoint.pt"
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(raw))
    log_before = (run / "log.jsonl").read_bytes()
    proc = _train(synthetic_root, run, "--epochs", "1", "--resume", check=False)
    assert proc.returncode == 1 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr
    assert ckpt.read_bytes() == bytes(raw) and (run / "log.jsonl").read_bytes() == log_before


def test_state_dict_mismatch_is_explained():
    net = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_state_dict_checked(net, {"weight": torch.zeros(4, 3), "bias": torch.zeros(2)}, "classifier")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_state_dict_checked(net, {"weight": torch.zeros(2, 3)})


def test_finite_guard_keeps_the_first_bad_step_on_the_device():
    guard = FiniteGuard()
    for step, value in enumerate([1.0, 2.0, float("inf"), float("nan"), 3.0]):
        guard.update(torch.tensor(value), step)
    assert guard.first_bad.dim() == 0 and guard.failed_step() == 2
    ok = FiniteGuard()
    ok.update(torch.tensor(1.0), 0)
    assert ok.failed_step() is None


def test_a_stop_signal_saves_the_step_reached_and_resume_continues_bit_identically(synthetic_root, tmp_path,
                                                                                   monkeypatch, capsys):
    """SIGTERM (SLURM pre-emption, `kill`) arrives during the 27th step (epoch 2, step 8 of 19): the run saves that
    step, says so and stops (exit status 128 + 15); --resume from it ends as the uninterrupted run."""
    monkeypatch.syspath_prepend(os.path.dirname(TINY))
    import tiny_train
    from common.cli import run_main

    def argv(run_dir, *extra):
        return ["--data-root", str(synthetic_root), "--run-dir", str(run_dir), "--epochs", "2", "--quiet", *extra]

    run_main(tiny_train.main, argv(tmp_path / "straight"))
    step, handler = tiny_train.TinyRun.train_step, signal.getsignal(signal.SIGTERM)

    def signalled_step(self, *args):
        out = step(self, *args)
        if self.steps == 27:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    with monkeypatch.context() as patch:
        patch.setattr(tiny_train.TinyRun, "train_step", signalled_step)
        with pytest.raises(SystemExit) as stopped:
            run_main(tiny_train.main, argv(tmp_path / "stopped"))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at epoch 2 after step 8" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is handler  # fit's handler is there only while it runs
    state = load_checkpoint(os.path.join(tmp_path, "stopped", "checkpoint.pt"))
    assert state["epochs_done"] == 1 and state["epoch_state"]["step"] == 8
    assert not os.path.exists(tmp_path / "stopped" / "finished")
    run_main(tiny_train.main, argv(tmp_path / "stopped", "--resume"))
    _assert_identical(_weights(tmp_path / "straight"), _weights(tmp_path / "stopped"))
    assert _log_without_times(tmp_path / "straight") == _log_without_times(tmp_path / "stopped")
