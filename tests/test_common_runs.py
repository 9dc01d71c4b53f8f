"""Run folders that cannot lie: a run is resumed, reused or overwritten only as asked, and only with its own settings;
expected failures end with a message, not a traceback."""
import json
import os
import subprocess
import sys

import pytest

import tiny_train
from common.digits import write_digits
from common.options import RunFinished, RunFolderError

TINY = os.path.join(os.path.dirname(__file__), "tiny_train.py")


def _main(data, run, *extra):
    return tiny_train.main(["--data-root", str(data), "--run-dir", str(run), "--epochs", "1", "--quiet",
                            "--steps-per-epoch", "3", "--eval-batches", "1", *extra])


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_resume_refuses_every_change_that_alters_training(synthetic_root, tmp_path):
    run = tmp_path / "run"
    _main(synthetic_root, run)
    os.remove(run / "finished")  # an interrupted run
    args_before = (run / "args.json").read_text()
    for change in (["--lr", "0.5"], ["--batch-size", "8"], ["--seed", "99"], ["--epochs", "2"],
                   ["--steps-per-epoch", "4"], ["--channels-last"]):
        with pytest.raises(RunFolderError) as e:
            _main(synthetic_root, run, "--resume", *change)  # argparse keeps the last value given
        flag = change[0][2:].replace("-", "_")
        assert f"--{flag}: the run has" in str(e.value) and "another --run-dir" in str(e.value)
    assert (run / "args.json").read_text() == args_before
    # options that do not alter training may change; the change is recorded, args.json is kept
    _main(synthetic_root, run, "--resume", "--save-every-steps", "2")
    assert (run / "args.json").read_text() == args_before
    resumes = _lines(run / "resumes.jsonl")
    assert resumes[-1]["changed"] == {"save_every_steps": [0, 2]}
    assert len(_lines(run / "log.jsonl")) == 1


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(synthetic_root, tmp_path):
    run = tmp_path / "run"
    _main(synthetic_root, run)
    with pytest.raises(RunFolderError, match="already holds a finished run"):
        _main(synthetic_root, run)
    with pytest.raises(RunFinished):
        _main(synthetic_root, run, "--resume")
    _main(synthetic_root, run, "--overwrite")
    assert len(_lines(run / "log.jsonl")) == 1
    assert len([f for f in os.listdir(run) if f.startswith("events.")]) <= 1
    with pytest.raises(SystemExit):  # parser.error
        _main(synthetic_root, run, "--overwrite", "--resume")


def test_overwrite_deletes_only_run_folders(synthetic_root, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "log.jsonl").write_text("not ours\n")
    with pytest.raises(RunFolderError, match="nothing was deleted"):
        _main(synthetic_root, folder, "--overwrite")
    assert (folder / "log.jsonl").read_text() == "not ours\n"


def test_resume_on_an_empty_folder_starts_a_new_run(synthetic_root, tmp_path, capsys):
    _main(synthetic_root, tmp_path / "new", "--resume")
    out = capsys.readouterr().out
    assert "no checkpoint in" in out and "starting a new run" in out
    assert len(_lines(tmp_path / "new" / "log.jsonl")) == 1


def test_a_run_on_other_data_is_not_resumed(synthetic_root, tmp_path):
    run = tmp_path / "run"
    _main(synthetic_root, run)
    os.remove(run / "finished")
    digits = tmp_path / "digits"
    write_digits(digits)
    with pytest.raises(RunFolderError, match="trained on synthetic data, --data-root now holds digits"):
        _main(digits, run, "--resume")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, TINY, "--quiet", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))


def test_expected_failures_print_their_message_only(tmp_path):
    missing = _cli("--data-root", tmp_path / "nowhere", "--run-dir", tmp_path / "a")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "cifar-10-batches-py" in missing.stderr and "cifar-10-python.tar.gz" in missing.stderr
    debug = _cli("--data-root", tmp_path / "nowhere", "--run-dir", tmp_path / "b", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    bad = _cli("--data-root", tmp_path, "--run-dir", tmp_path / "c", "--lr", "-0.1")
    assert bad.returncode == 2 and "--lr must be positive" in bad.stderr and "Traceback" not in bad.stderr
    blocker = tmp_path / "a-file"  # a run folder that cannot be created (root may write anywhere else)
    blocker.write_text("")
    denied = _cli("--data-root", tmp_path, "--run-dir", blocker / "run")
    assert denied.returncode == 1 and "Not a directory" in denied.stderr and "Traceback" not in denied.stderr
