"""Run directories: args.json, log.jsonl, tensorboardX events, progress bars, and the non-finite-loss guard.

Every training script writes, under its run directory:
    args.json    all options, plus torch/CUDA versions, git commit, device, the command line
    log.jsonl    one JSON object per epoch (the contract `python -m common.compare` reads)
    finished     written when the run completed its schedule (reproduce.sh skips such runs)
    events.*     tensorboardX scalars of the same numbers (when tensorboardX is installed)
"""
import json
import math
import os
import subprocess
import sys
import time

import torch

FINISHED_NAME = "finished"


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device=None):
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "python": sys.version.split()[0], "git_commit": git_commit(), "device": str(device),
           "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return env


def jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


class RunLogger:
    """Writes the run directory. Only the main process (rank 0) writes; other ranks get a silent logger.

    RECORD (a new run's args.json content) is written when given; a resumed run keeps the args.json it started with.
    """

    def __init__(self, run_dir, record=None, enabled=True, quiet=False):
        self.run_dir, self.enabled = run_dir, enabled
        self.quiet = quiet or not sys.stderr.isatty()
        self.writer = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if record is not None:
            with open(os.path.join(run_dir, "args.json"), "w") as f:
                json.dump(record, f, indent=2)
        try:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(run_dir)
        except ImportError:
            pass  # log.jsonl is the record; event files are a convenience

    def progress(self, iterable, desc="", total=None, leave=False):
        if self.quiet or not self.enabled:
            return iterable
        try:
            from tqdm import tqdm
        except ImportError:  # progress bars are optional
            return iterable
        return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True)

    def print(self, *msg):
        if self.enabled:
            print(*msg, flush=True)

    def log_epoch(self, record):
        """Append one epoch's numbers to log.jsonl (durably) and to the event file. Needs an 'epoch' key."""
        if not self.enabled:
            return
        record = {k: jsonable(v) for k, v in record.items()}
        with open(os.path.join(self.run_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                    self.writer.add_scalar(k, v, record["epoch"])
            self.writer.flush()

    def keep_first(self, n):
        """On resume: keep the first N records of log.jsonl (one per completed epoch), drop what came after."""
        path = os.path.join(self.run_dir, "log.jsonl")
        if not self.enabled or not os.path.exists(path):
            return
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        with open(path, "w") as f:
            f.writelines(lines[:n])

    def finish(self, summary=None):
        if not self.enabled:
            return
        with open(os.path.join(self.run_dir, FINISHED_NAME), "w") as f:
            json.dump(jsonable(dict(summary or {}, time=time.strftime("%Y-%m-%d %H:%M:%S"))), f)
        if self.writer is not None:
            self.writer.close()


def read_log(run_dir):
    """The records of a run's log.jsonl (an empty list when absent)."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class NonFiniteLossError(RuntimeError):
    pass


class FiniteGuard:
    """Watches the training loss without a host sync per step.

    update(loss, step) every step keeps, on the device, the first step whose loss was not finite; failed_step() reads
    it (common.loop.fit does, at the print interval and before every checkpoint, so that a diverged state is never
    saved over a good one, and raises NonFiniteLossError naming the step and what the kept checkpoints hold).
    """

    def __init__(self):
        self.first_bad = None

    def update(self, loss, step=0):
        bad = ~torch.isfinite(loss.detach()).all()
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def failed_step(self):
        """The first step whose loss was NaN or inf since the last reset, or None (one host read)."""
        if self.first_bad is None:
            return None
        step = int(self.first_bad)
        return None if step < 0 else step
