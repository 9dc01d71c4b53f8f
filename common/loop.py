"""The one epoch driver of every training script, and the one evaluation loop.

A paper supplies a `Run` (its networks, optimizers, lr policy, step and evaluation) and calls

    fit(run, train_loader, setup, epochs=range(args.epochs), print_every=args.print_freq)

`fit` owns everything that is the same in every paper: resuming (the checkpoint, its identity check, the RNG
streams, the loader's and the sampler's state, log.jsonl cut back to the checkpoint), the exact replay of a
half-done epoch, the step and evaluation limits of smoke runs, the meter of the epoch, the finite-loss guard,
periodic and end-of-epoch checkpoints, and the epoch's log.jsonl line. Every quirk of the released code stays in the
paper's Run.

Per epoch: run.on_epoch_start(epoch); for each batch run.train_step(step, x, y) -> {name: 0-d tensor} (summed on the
device by a Meter: no host sync per step; "loss" is the total the finite guard watches); then run.train_record(meter)
and run.evaluate(epoch) make the log line, run.on_epoch_end(epoch, record) does what the authors did at the epoch end
(best model, their files, schedulers), and the checkpoint is written before the line is logged.

Checkpoints: `checkpoint.pt` (the latest, inside or at the end of an epoch) and `epoch_end.pt` (the last completed
epoch). A non-finite loss stops the run before anything is saved, and the message says which step went wrong and
what each kept file holds.

SIGTERM or SIGUSR1 (SLURM pre-empting a job or ending its time, `kill`, a reproduce.sh pool stopped with Ctrl-C)
stops the run at the next step boundary: that step is checkpointed and the process exits with RunStopped's message
(`--resume` continues from that step, bit-exactly on the CPU). In a distributed run the processes agree on the stop
every STOP_CHECK_EVERY steps, so that all of them save the same step.

Tests interrupt a run at an exact point with OKD_KILL_AFTER_STEP=N: the process SIGKILLs itself right after its N-th
training step (and any checkpoint due then).
"""
import abc
import os
import signal
import threading

import torch
import torch.distributed as dist

from common.checkpoint import CheckpointError, ResumableEpoch, keep_copy, load_checkpoint, save_checkpoint
from common.distributed import barrier
from common.logging import NonFiniteLossError, FiniteGuard
from common.meters import Meter, Timer
from common.options import identity_differences

KILL_ENV = "OKD_KILL_AFTER_STEP"
EPOCH_END_NAME = "epoch_end.pt"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_CHECK_EVERY = 10  # steps between the distributed processes' agreement on a stop request (one tiny all-reduce)


class RunStopped(Exception):
    """A stop signal arrived; the run saved the step it had reached and stopped (an expected end: --resume)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class Run(abc.ABC):
    """The paper's side of `fit`: train_step, state_dict and load_state_dict, and whichever hooks the paper needs
    (the defaults do nothing)."""

    def on_epoch_start(self, epoch):
        """The learning-rate policy and any per-epoch weight (called before the epoch's first step)."""

    @abc.abstractmethod
    def train_step(self, step, x, y):
        """One iteration on a batch already on the device. Returns {name: 0-d tensor} with at least "loss"."""

    def train_record(self, meter):
        """log.jsonl entries of the epoch's training metrics (default: per-sample means, prefixed train/)."""
        return meter.per_sample("train/")

    def evaluate(self, epoch):
        """log.jsonl entries of the evaluation after EPOCH."""
        return {}

    def on_epoch_end(self, epoch, record):
        """After evaluation, before the checkpoint: best-model tracking, the authors' files, schedulers."""

    def on_print(self, epoch, step, meter):
        """At the print interval (the authors' running console lines)."""

    def epoch_label(self, epoch):
        """The "epoch" value of log.jsonl for EPOCH (default: epochs counted from 1)."""
        return epoch + 1

    def truncate_logs(self, epochs_done):
        """On resume: cut the authors' own log files back to EPOCHS_DONE epochs."""

    def summary(self, record):
        """What the `finished` marker keeps of the last record."""
        return {k: v for k, v in record.items() if k.startswith(("test/", "best/"))}

    @abc.abstractmethod
    def state_dict(self):
        """Everything a resume needs: networks, optimizers, schedulers, best values, the paper's own counters."""

    @abc.abstractmethod
    def load_state_dict(self, state):
        """The inverse of state_dict (tensors arrive on the run's device)."""


class _StopRequest:
    """Catches STOP_SIGNALS while fit runs (only the main thread can install handlers; elsewhere it catches none)."""

    def __init__(self, ctx):
        self.ctx, self.signum, self.previous, self.pid = ctx, None, {}, os.getpid()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._caught)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _caught(self, signum, frame):
        if os.getpid() != self.pid:  # a loader worker forked while the handler was installed: end as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum

    def requested(self, step=None):
        """The signal to stop for after 0-based STEP (None: at an epoch end), agreed by every process, or None."""
        if not self.ctx.distributed:
            return self.signum
        if step is not None and (step + 1) % STOP_CHECK_EVERY:
            return None
        t = torch.tensor([self.signum or 0], dtype=torch.long, device=self.ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t) or None


class _Checkpoints:
    """checkpoint.pt and epoch_end.pt of one run, and what they hold (for honest messages)."""

    def __init__(self, setup):
        self.setup = setup
        self.path = setup.checkpoint
        self.epoch_end = os.path.join(setup.run_dir, EPOCH_END_NAME)
        self.latest = None      # description of what checkpoint.pt holds
        self.completed = None   # description of what epoch_end.pt holds

    def save(self, run, loader, epochs_done, label, epoch_state=None):
        state = {"run": run.state_dict(), "epochs_done": epochs_done, "epoch_state": epoch_state}
        if epoch_state is None and hasattr(loader, "state_dict"):
            state["loader"] = loader.state_dict()
        if self.setup.ctx.is_main:
            save_checkpoint(self.path, state, meta=self.setup.identity)
            if epoch_state is None:
                keep_copy(self.path, self.epoch_end)
        barrier(self.setup.ctx)
        if epoch_state is None:
            self.latest = self.completed = f"the end of epoch {label}"
        else:
            self.latest = f"epoch {label} after step {epoch_state['step']}"

    def load(self):
        state = load_checkpoint(self.path, map_location=self.setup.device, restore_rng=True)
        diffs = identity_differences(state.get("meta", {}), self.setup.identity)
        if diffs:
            raise CheckpointError(f"checkpoint {self.path} belongs to a run with other settings:\n  "
                                  + "\n  ".join(diffs))
        return state

    def stopped(self, signum, where):
        return RunStopped(f"stopped by {signal.Signals(signum).name} at {where}: {self.path} holds that point; run "
                          f"the same command with --resume to continue from it", signum)

    def non_finite(self, label, step):
        """The message of a NaN/inf stop at STEP (0-based) of epoch LABEL."""
        msg = f"the training loss became NaN or inf at epoch {label}, step {step + 1} (its first non-finite value); " \
              f"the run stopped and nothing was saved after it."
        if self.latest is None:
            msg += " No checkpoint of this process precedes it."
        else:
            msg += (f" {self.path} holds {self.latest}, the last state saved before that step: the loss became "
                    f"non-finite soon after it, so its weights may already be diverging and resuming it unchanged "
                    f"will likely fail again.")
        if self.completed is not None and self.completed != self.latest:
            msg += f" {self.epoch_end} holds {self.completed}, the last completed epoch."
        return msg + " To train with other settings (a lower learning rate, say), start a new run: another " \
                     "--run-dir, or --overwrite."


def _stop_if_non_finite(guard, checkpoints, label, ctx):
    step = guard.failed_step()
    if ctx.distributed:  # every process stops at the same check, at the earliest bad step of any of them
        t = torch.tensor([step if step is not None else 2 ** 62], dtype=torch.long, device=ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        step = None if int(t) == 2 ** 62 else int(t)
    if step is not None:
        raise NonFiniteLossError(checkpoints.non_finite(label, step))


def fit(run, loader, setup, epochs, print_every=0):
    """Train RUN for EPOCHS (an int or a range of the paper's epoch numbers); returns the last log record."""
    epochs = range(epochs) if isinstance(epochs, int) else epochs
    logger, ctx = setup.logger, setup.ctx
    checkpoints = _Checkpoints(setup)
    done, epoch_state, state = 0, None, None
    if setup.resume:
        state = checkpoints.load()
        done, epoch_state = state["epochs_done"], state.get("epoch_state")
        if epoch_state is None:
            run.load_state_dict(state["run"])
            if state.get("loader") is not None:
                loader.load_state_dict(state["loader"])
            checkpoints.latest = checkpoints.completed = f"the end of epoch {run.epoch_label(epochs[done - 1])}" \
                if done else None
        logger.keep_first(done)
        run.truncate_logs(done)
        logger.print(f"resumed {setup.run_dir} after {done} epoch(s)"
                     + (f" and {epoch_state['step']} step(s)" if epoch_state else ""))
    with _StopRequest(ctx) as stop:
        kill_after = int(os.environ.get(KILL_ENV, "0"))
        steps_run = 0
        guard = FiniteGuard()
        record = {}
        for epoch in epochs[done:]:
            label = run.epoch_label(epoch)
            run.on_epoch_start(epoch)
            meter = Meter()
            if epoch_state is not None:  # half-done epoch: its state goes over what on_epoch_start set up
                run.load_state_dict(state["run"])
                meter.load_state_dict(epoch_state["meter"], setup.device)
                checkpoints.latest = f"epoch {label} after step {epoch_state['step']}"
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            timer = Timer()
            total = min(len(loader), setup.steps_per_epoch) if setup.steps_per_epoch else len(loader)
            batches = ResumableEpoch(loader, resume=epoch_state)
            epoch_state = None
            progress = logger.progress(batches, desc=f"epoch {label}/{run.epoch_label(epochs[-1])}", total=total)
            for step, (x, y) in progress:
                if step >= total:
                    break
                x, y = setup.fast.inputs(x, y)
                values = run.train_step(step, x, y)
                guard.update(values["loss"], step)
                meter.update(values, x.size(0))
                steps_run += 1
                if print_every and (step + 1) % print_every == 0:
                    _stop_if_non_finite(guard, checkpoints, label, ctx)
                    run.on_print(epoch, step, meter)
                    if hasattr(progress, "set_postfix"):
                        progress.set_postfix(loss=f"{float(values['loss']):.4f}")
                signum = stop.requested(step) if step + 1 < total else None
                if signum or setup.save_every_steps and (step + 1) % setup.save_every_steps == 0 and step + 1 < total:
                    _stop_if_non_finite(guard, checkpoints, label, ctx)
                    checkpoints.save(run, loader, done, label, dict(batches.state(step + 1), meter=meter.state_dict()))
                if kill_after and steps_run == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                if signum:
                    raise checkpoints.stopped(signum, f"epoch {label} after step {step + 1}")
            _stop_if_non_finite(guard, checkpoints, label, ctx)
            train_time = timer.elapsed()
            meter.all_reduce(ctx)
            record = {"epoch": label, **run.train_record(meter)}
            record.update(run.evaluate(epoch))
            record.update(epoch_time=timer.elapsed(), train_time=train_time,
                          images_per_s=meter.count / max(train_time, 1e-9))
            run.on_epoch_end(epoch, record)
            done += 1
            checkpoints.save(run, loader, done, label)
            logger.log_epoch(record)
            signum = stop.requested()
            if signum and epoch != epochs[-1]:
                raise checkpoints.stopped(signum, f"the end of epoch {label}")
    logger.finish(run.summary(record))
    return record


@torch.no_grad()
def evaluate(forward, loader, setup, desc="test"):
    """FORWARD(x, y) -> {name: 0-d tensor} over the test loader (at most --eval-batches batches), each batch metered
    with its size and summed over processes. Returns the Meter (per_sample() / per_batch() read it once)."""
    meter = Meter()
    total = min(len(loader), setup.eval_batches) if setup.eval_batches else len(loader)
    for i, (x, y) in enumerate(setup.logger.progress(loader, desc=desc, total=total)):
        if i >= total:
            break
        x, y = setup.fast.inputs(x, y)
        meter.update(forward(x, y), x.size(0))
    return meter.all_reduce(setup.ctx)
