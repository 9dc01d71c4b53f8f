"""The options every training script shares, and the one place where a run's setup is decided.

    def get_args_parser():                        # in every script: the authors' flags, then these two groups
        parser = argparse.ArgumentParser(...)
        ...
        add_run_args(parser)
        add_fast_args(parser)
        return parser

    args = get_args_parser().parse_args(argv)
    run = setup_run(parser, args, script="dcm/main.py", default_run_dir=..., seed=args.seed)

`setup_run` decides, in this fixed order: the device (and torchrun's process group), the fast path, determinism,
the seeds, and the run folder. It writes nothing into `args`; what it derives is in the returned `RunSetup`.

The run folder is where a run's identity lives. A new run writes `args.json` with every option and an `identity`:
the options that alter training (all of them but the few in MAY_CHANGE and the script's own `may_change`), the kind
of data (real, synthetic, digits) and the number of processes. A folder that already holds a run is refused unless
`--resume` (continue it; refused if any option of its identity changed, with the list of what differs; a finished
run says so and stops) or `--overwrite` (delete it and start again). Options that may change on resume are recorded
in `resumes.jsonl`; `args.json` always describes how the run was started.
"""
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import distributed
from common.data import data_kind
from common.fast import Fast
from common.logging import FINISHED_NAME, RunLogger, environment, jsonable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_ROOT_ENV = "DATA_ROOT"
DEBUG_ENV = "OKD_DEBUG"
# Options that never change what is trained: where things go, how much is printed, how often a checkpoint is
# written, where the data is read from (its kind is checked instead), which device runs it.
MAY_CHANGE = ("run_dir", "data_root", "resume", "overwrite", "quiet", "debug", "device", "save_every_steps")
RUN_FILES = ("args.json", "log.jsonl", "checkpoint.pt", FINISHED_NAME)


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked (it holds another run, or a run with other settings)."""


class RunFinished(SystemExit):
    """--resume on a run that completed its schedule: nothing to do (exit status 0)."""

    def __init__(self, message):
        print(message, flush=True)
        super().__init__(0)


def default_data_root():
    """$DATA_ROOT, else <repository>/data: one default for every script (and reproduce.sh)."""
    return os.environ.get(DATA_ROOT_ENV) or os.path.join(REPO, "data")


def add_run_args(parser, data_root_aliases=(), default_workers=None):
    """Run management, the same in every script. DATA_ROOT_ALIASES: the authors' name for the data flag."""
    g = parser.add_argument_group("run management (the same in every script of this repository)")
    g.add_argument("--run-dir", default=None, help="folder of this run: args.json, log.jsonl, events, checkpoints")
    g.add_argument("--data-root", *data_root_aliases, dest="data_root", default=default_data_root(),
                   help=f"folder holding cifar-10-batches-py/ and cifar-100-python/ (ImageNet: train/ and val/); "
                        f"default ${DATA_ROOT_ENV}, else <repository>/data")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its checkpoint (refused if a training option changed)")
    g.add_argument("--overwrite", action="store_true", help="delete the run in --run-dir and start it again")
    g.add_argument("--quiet", action="store_true", help="no progress bars (also off when stderr is not a terminal)")
    g.add_argument("--debug", action="store_true", help=f"show tracebacks of expected errors (or set {DEBUG_ENV}=1)")
    g.add_argument("--steps-per-epoch", type=int, default=0,
                   help="stop each training epoch after this many iterations (0: the whole epoch; for smoke runs)")
    g.add_argument("--eval-batches", type=int, default=0, help="evaluate on this many test batches (0: all)")
    g.add_argument("--save-every-steps", type=int, default=0,
                   help="also checkpoint every N iterations inside an epoch (0: at epoch ends only)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms and cudnn settings (cudnn.benchmark off); slower on GPUs")
    return g


def loader_workers(requested):
    """The authors' default number of loader processes, never more than this machine's cores."""
    return max(0, min(requested, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                      os.cpu_count() or 1))


def check_positive(parser, args, names, allow_zero=()):
    """parser.error for any of NAMES (dests) that is not > 0 (>= 0 for those in ALLOW_ZERO)."""
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        floor_ok = (lambda v: v >= 0) if name in allow_zero else (lambda v: v > 0)
        if not all(floor_ok(v) for v in values):
            flag = "--" + name.replace("_", "-") if f"--{name}" not in parser._option_string_actions else f"--{name}"
            parser.error(f"{flag} must be {'>= 0' if name in allow_zero else 'positive'}; got {value}")


@dataclass(frozen=True)
class RunSetup:
    """Where and how one run runs; built once by setup_run and passed to the loop and the paper's code."""
    script: str
    run_dir: str
    device: torch.device
    ctx: distributed.DistContext
    fast: Fast
    identity: dict
    resume: bool                 # a checkpoint is there to continue from
    logger: RunLogger
    steps_per_epoch: int = 0
    eval_batches: int = 0
    save_every_steps: int = 0

    @property
    def checkpoint(self):
        return os.path.join(self.run_dir, "checkpoint.pt")


def detached_setup(fast, eval_batches=0):
    """A RunSetup for a paper's Run outside a training run (a parity checker, a bench case, an evaluation script, the
    tests): one process on the Fast value's device, no run folder, nothing written or printed."""
    return RunSetup(script="", run_dir="", device=fast.device, ctx=distributed.DistContext(device=fast.device),
                    fast=fast, identity={}, resume=False, logger=RunLogger("", enabled=False),
                    eval_batches=eval_batches)


def resolve_device(parser, name):
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r}: not a device (cpu, cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name}: only cpu and cuda are supported")
    return device


def set_determinism(deterministic, cudnn_benchmark):
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = cudnn_benchmark


def seed_streams(seed, streams=("torch", "numpy", "random")):
    """Seed the named generators (the ones the authors' script seeded, in its order)."""
    for stream in streams:
        {"torch": torch.manual_seed, "numpy": np.random.seed, "random": random.seed}[stream](seed)


def run_identity(args, script, world_size, may_change=()):
    """What a run is: every option that alters training, the kind of data, the number of processes."""
    skip = set(MAY_CHANGE) | set(may_change)
    options = {k: jsonable(v) for k, v in sorted(vars(args).items()) if k not in skip}
    return {"script": script, "options": options, "data": data_kind(getattr(args, "data_root", None)),
            "world_size": world_size}


def identity_differences(stored, current):
    """Human-readable lines, one per difference between two identities."""
    lines = []
    if stored.get("script") != current.get("script"):
        lines.append(f"script: the run is {stored.get('script')}, this is {current.get('script')}")
    if stored.get("data") != current.get("data"):
        lines.append(f"data: the run trained on {stored.get('data')} data, --data-root now holds {current.get('data')}")
    if stored.get("world_size") != current.get("world_size"):
        lines.append(f"processes: the run used {stored.get('world_size')}, this launch has {current.get('world_size')}")
    old, new = stored.get("options", {}), current.get("options", {})
    for k in sorted(set(old) | set(new)):
        if old.get(k, "<absent>") != new.get(k, "<absent>"):
            lines.append(f"--{k}: the run has {old.get(k, '<absent>')!r}, this command has {new.get(k, '<absent>')!r}")
    return lines


def read_args_json(run_dir):
    path = os.path.join(run_dir, "args.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def holds_run(run_dir):
    return any(os.path.exists(os.path.join(run_dir, name)) for name in RUN_FILES)


def prepare_run_folder(run_dir, identity, resume, overwrite, may_change_now):
    """Decide what to do with RUN_DIR; returns True when a checkpoint is there to resume from."""
    if not holds_run(run_dir):
        if resume:
            print(f"--resume: no checkpoint in {run_dir}: starting a new run", flush=True)
        return False
    stored = read_args_json(run_dir)
    if overwrite:
        if stored is None or "script" not in stored:
            raise RunFolderError(f"--overwrite: {run_dir} does not look like a run folder of this repository (no "
                                 f"readable args.json); nothing was deleted. Choose another --run-dir.")
        shutil.rmtree(run_dir)
        print(f"--overwrite: deleted the previous run in {run_dir}", flush=True)
        return False
    where = f"run folder {run_dir}"
    finished = os.path.exists(os.path.join(run_dir, FINISHED_NAME))
    if not resume:
        if finished:
            raise RunFolderError(f"{where} already holds a finished run. To train it again, pass --overwrite (deletes "
                                 f"it), or choose another --run-dir.")
        raise RunFolderError(f"{where} already holds an unfinished run. Continue it with --resume, start it again "
                             f"with --overwrite (deletes it), or choose another --run-dir.")
    if stored is None or "identity" not in stored:
        raise RunFolderError(f"{where} holds a run written by an earlier version of this repository (its args.json "
                             f"records no identity), so it cannot be resumed safely. Start a new run: --overwrite, "
                             f"or another --run-dir.")
    diffs = identity_differences(stored["identity"], identity)
    if diffs:
        raise RunFolderError(f"{where} holds a run made with other settings, so --resume would mix two runs:\n  "
                             + "\n  ".join(diffs) + "\nStart a new run for these settings in another --run-dir, or "
                             "replace this one with --overwrite.")
    changed = {k: [stored.get(k), v] for k, v in may_change_now.items()
               if stored.get(k) != v and k not in ("resume", "overwrite")}
    if finished:
        raise RunFinished(f"{where}: finished already; nothing to do (start it again with --overwrite).")
    if not os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        print(f"--resume: no checkpoint in {run_dir}: starting a new run", flush=True)
        for name in RUN_FILES:
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
        return False
    with open(os.path.join(run_dir, "resumes.jsonl"), "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": environment()["command"],
                            "changed": changed}) + "\n")
    return True


def setup_run(parser, args, script, default_run_dir, seed=None, streams=("torch", "numpy", "random"),
              cudnn_benchmark=False, may_change=(), device=None):
    """Device, fast path, determinism, seeds and run folder, in this order (see the module docstring).

    SEED and STREAMS: the seed and the generators the authors' script seeded (None: no seeding, as released).
    CUDNN_BENCHMARK: the released cudnn.benchmark; --fast turns it on on GPUs, --deterministic off.
    MAY_CHANGE: further options of this script that may differ on resume (print intervals, loader workers).
    DEVICE: the device when the script chose it otherwise (e.g. from the authors' --gpu_ids)."""
    if getattr(args, "steps_per_epoch", 0) < 0 or getattr(args, "eval_batches", 0) < 0 or \
            getattr(args, "save_every_steps", 0) < 0:
        parser.error("--steps-per-epoch, --eval-batches and --save-every-steps must be >= 0")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other: choose one")
    device = resolve_device(parser, str(device if device is not None else args.device))
    ctx = distributed.init_distributed(device)
    device = ctx.device if ctx.distributed else device
    fast = Fast.from_args(args, device)
    set_determinism(args.deterministic, cudnn_benchmark or (fast.enabled and device.type == "cuda"))
    if seed is not None:
        seed_streams(seed, streams)
    run_dir = os.path.abspath(args.run_dir or default_run_dir)
    identity = run_identity(args, script, ctx.world_size, may_change)
    may_change_now = {k: jsonable(getattr(args, k)) for k in (*MAY_CHANGE, *may_change) if hasattr(args, k)}
    # Rank 0 decides about the folder; every process learns the outcome (0 new, 1 resume, 2 stop).
    outcome, failure = 0, None
    if ctx.is_main:
        try:
            outcome = int(prepare_run_folder(run_dir, identity, args.resume, args.overwrite, may_change_now))
            os.makedirs(run_dir, exist_ok=True)
        except (RunFolderError, RunFinished, OSError) as e:
            outcome, failure = 2, e
    outcome = distributed.broadcast_int(outcome, ctx)
    if failure is not None:
        raise failure
    if outcome == 2:
        raise SystemExit(0)  # rank 0 says why
    resume = outcome == 1
    record = None if resume else {"script": script, **{k: jsonable(v) for k, v in vars(args).items()},
                                  "identity": identity, "env": environment(device)}
    logger = RunLogger(run_dir, record, enabled=ctx.is_main, quiet=args.quiet)
    return RunSetup(script=script, run_dir=run_dir, device=device, ctx=ctx, fast=fast, identity=identity,
                    resume=resume, logger=logger, steps_per_epoch=args.steps_per_epoch,
                    eval_batches=args.eval_batches, save_every_steps=args.save_every_steps)


def debug_requested(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
