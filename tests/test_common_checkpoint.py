import json
import os
import subprocess
import sys

import pytest
import torch

from common.checkpoint import CheckpointError, load_checkpoint, load_state_dict_checked, save_checkpoint
from common.logging import FiniteGuard, NonFiniteLossError

TINY = os.path.join(os.path.dirname(__file__), "tiny_train.py")


def _train(data_root, run_dir, *extra, kill_at=None, check=True):
    env = dict(os.environ)
    env.pop("TINY_TRAIN_KILL_AT_STEP", None)
    if kill_at:
        env["TINY_TRAIN_KILL_AT_STEP"] = str(kill_at)
    proc = subprocess.run([sys.executable, TINY, "--data-root", str(data_root), "--run-dir", str(run_dir),
                           "--epochs", "2", "--quiet", *extra], env=env, capture_output=True, text=True)
    if check and kill_at is None:
        assert proc.returncode == 0, proc.stderr
    return proc


def _weights(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["model"]


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _log_without_times(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("epoch_time", "images_per_s")} for line in f]


@pytest.mark.parametrize("workers,save_every", [(0, 0), (2, 5)])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(synthetic_root, tmp_path, workers, save_every):
    """19 steps per epoch; the run is killed at global step 27 (inside epoch 2) and resumed."""
    opts = ["--workers", str(workers), "--save-every-steps", str(save_every)]
    _train(synthetic_root, tmp_path / "straight", *opts)
    killed = _train(synthetic_root, tmp_path / "killed", *opts, kill_at=27)
    assert killed.returncode == -9  # SIGKILL
    assert not os.path.exists(tmp_path / "killed" / "finished")
    _train(synthetic_root, tmp_path / "killed", *opts, "--resume")
    _assert_identical(_weights(tmp_path / "straight"), _weights(tmp_path / "killed"))
    assert _log_without_times(tmp_path / "straight") == _log_without_times(tmp_path / "killed")


def test_nan_loss_stops_with_last_good_checkpoint_intact(synthetic_root, tmp_path):
    proc = _train(synthetic_root, tmp_path / "run", "--nan-from-epoch", "2", check=False)
    assert proc.returncode != 0 and "NaN or inf" in proc.stderr and "intact" in proc.stderr
    ckpt = load_checkpoint(os.path.join(tmp_path, "run", "checkpoint.pt"))
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


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
    return good, [truncated, bitflip, foreign, garbage]


def test_bad_checkpoints_are_refused_and_nothing_is_overwritten(tmp_path):
    good, bad = _corrupt_cases(tmp_path)
    for path in bad:
        before = path.read_bytes()
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert str(path) in str(e.value)
        assert path.read_bytes() == before
    with pytest.raises(CheckpointError, match="arch: checkpoint has 'a', this run has 'b'"):
        load_checkpoint(good, expect_meta={"arch": "b"})
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_resume_from_corrupt_checkpoint_fails_without_touching_the_run(synthetic_root, tmp_path):
    run = tmp_path / "run"
    _train(synthetic_root, run, "--epochs", "1")
    ckpt = run / "checkpoint.pt"
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(raw))
    log_before = (run / "log.jsonl").read_bytes()
    proc = _train(synthetic_root, run, "--resume", check=False)
    assert proc.returncode != 0 and "corrupt" in proc.stderr
    assert ckpt.read_bytes() == bytes(raw) and (run / "log.jsonl").read_bytes() == log_before


def test_state_dict_mismatch_is_explained():
    net = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_state_dict_checked(net, {"weight": torch.zeros(4, 3), "bias": torch.zeros(2)}, "classifier")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_state_dict_checked(net, {"weight": torch.zeros(2, 3)})


def test_finite_guard():
    guard = FiniteGuard()
    guard.update(torch.tensor(1.0))
    guard.check("step 1")
    guard.update(torch.tensor(float("inf")))
    guard.update(torch.tensor(2.0))
    with pytest.raises(NonFiniteLossError, match="step 3"):
        guard.check("step 3", "run/checkpoint.pt")
