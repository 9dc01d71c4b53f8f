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
import warnings

import torch

FINISHED_NAME = "finished"


def add_common_args(parser, data_root_default="./data", data_root_flags=("--data-root",)):
    """Options every training script of the repository has, whatever the authors' script called its own."""
    g = parser.add_argument_group("run management (common to every script of this repository)")
    g.add_argument("--run-dir", default=None, help="folder for args.json, log.jsonl, events and checkpoints")
    g.add_argument(*data_root_flags, dest="data_root", default=data_root_default,
                   help="folder holding the dataset (cifar-*-python or ImageNet train/ and val/)")
    g.add_argument("--resume", action="store_true",
                   help="continue from <run-dir>/checkpoint.pt if it exists (start fresh otherwise)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--steps-per-epoch", type=int, default=0,
                   help="stop each training epoch after this many iterations (0 = full epoch; for smoke runs)")
    g.add_argument("--eval-batches", type=int, default=0, help="evaluate on this many test batches (0 = all)")
    g.add_argument("--save-every-steps", type=int, default=0,
                   help="also checkpoint every N iterations inside an epoch (0 = at epoch ends only)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (cudnn.benchmark off), for debugging; slower on GPUs")
    return g


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


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


class RunLogger:
    """Writes the run directory. Only the main process (rank 0) writes; other ranks get a silent logger."""

    def __init__(self, run_dir, args, script, enabled=True, quiet=False, device=None):
        self.run_dir, self.enabled = run_dir, enabled
        self.quiet = quiet or not sys.stderr.isatty()
        self.writer = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        record = {"script": script, **{k: _jsonable(v) for k, v in vars(args).items()}, "env": environment(device)}
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(record, f, indent=2)
        try:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(run_dir)
        except ImportError:
            warnings.warn("tensorboardX is not installed: no event files; log.jsonl is still written")

    def progress(self, iterable, desc="", total=None, leave=False):
        if self.quiet or not self.enabled:
            return iterable
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True)

    def print(self, *msg):
        if self.enabled:
            print(*msg, flush=True)

    def log_epoch(self, record):
        """Append one epoch's numbers to log.jsonl (durably) and to the event file. Needs an 'epoch' key."""
        if not self.enabled:
            return
        record = {k: _jsonable(v) for k, v in record.items()}
        with open(os.path.join(self.run_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                    self.writer.add_scalar(k, v, record["epoch"])
            self.writer.flush()

    def truncate_after(self, epoch):
        """On resume: drop log lines of epochs after the checkpoint's (they will be recomputed identically)."""
        path = os.path.join(self.run_dir, "log.jsonl")
        if not self.enabled or not os.path.exists(path):
            return
        with open(path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("epoch", -1) <= epoch]
        with open(path, "w") as f:
            f.writelines(keep)

    def finish(self, summary=None):
        if not self.enabled:
            return
        with open(os.path.join(self.run_dir, FINISHED_NAME), "w") as f:
            json.dump(_jsonable(dict(summary or {}, time=time.strftime("%Y-%m-%d %H:%M:%S"))), f)
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
    """Accumulates 'every loss so far was finite' on the device; check() syncs and raises on the first failure.

    Call update(loss) every step (no host sync) and check() at the print interval and always before a checkpoint
    is written, so a diverged state never overwrites the last good checkpoint.
    """

    def __init__(self):
        self.ok = None

    def update(self, loss):
        finite = torch.isfinite(loss.detach()).all()
        self.ok = finite if self.ok is None else self.ok & finite

    def check(self, where, checkpoint=None):
        if self.ok is not None and not bool(self.ok):
            kept = f" The last good checkpoint {checkpoint} is intact; resume from it with --resume" \
                   f" (after lowering the learning rate, for instance)." if checkpoint else ""
            raise NonFiniteLossError(f"the training loss became NaN or inf (detected at {where}); run stopped.{kept}")
        self.ok = None
