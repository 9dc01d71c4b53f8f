"""What `bash reproduce.sh` runs.

    bash reproduce.sh list                                      # every table, with its distinct runs and their cost
    bash reproduce.sh table3 [--scale smoke|short|full] [--seeds "1 2 3"] [--out runs] [--data-root DIR] [--dry-run]
    bash reproduce.sh table3 --plan                             # runs, epochs, images, GPU-hours before starting
    bash reproduce.sh table3 --jobs 4 [--gpus 0,1,2,3]          # up to 4 runs at once, one GPU each
    bash reproduce.sh table3 --slurm [--partition P --gpus-per-job 1 --time 24:00]   # a SLURM job array (submitit)
    bash reproduce.sh smoke                                     # every method for a few steps on synthetic data

A table is a set of distinct runs: rows that read the same run (the same command and seed) share it, so nothing is
trained twice. Every run goes to OUT/<table>/<scale>/<run>/seed<k>, so runs of different scales never share a
folder, and is launched with --resume: a finished run with the same settings is reported and skipped by the script
itself, an interrupted one continues from its checkpoint, and a folder holding a run with other settings is refused
with the list of differences. `rows.json` in each run folder names the table rows it stands for; the comparison with
the published numbers reads it at the end.

Local runs of the python launcher start in a process forked from a server that has imported torch once (a fresh,
isolated process per run, without the import). --jobs runs several at once (the ImageNet rows as torchrun jobs over
--nproc GPUs each), each with its own CUDA_VISIBLE_DEVICES and its console output in <run>/output.log; a failed run
never stops the others. --slurm submits one array task per run through submitit (`pip install submitit`); a task
that is pre-empted or reaches its time limit checkpoints and requeues itself, and resumes where it stopped. Where
SLURM is not installed, the same path runs on submitit's local executor.
"""
import argparse
import json
import multiprocessing
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from common.compare import main as compare_main
from common.logging import FINISHED_NAME
from common.results import all_smoke_runs, all_tables, find_table
from common.synthetic import write_cifar, write_imagefolder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS_FILE = "rows.json"
OUTPUT_LOG = "output.log"


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


@dataclass
class Job:
    """One distinct run: a command in a run folder, and the table rows that read it."""
    name: str
    cwd: str
    argv: list                    # the script and its options (no launcher)
    run_dir: str
    launcher: str = "python"      # "python" or "torchrun"
    nproc: int = 1
    rows: list = field(default_factory=list)  # [{"table": id, "row": name}]
    epochs: int = 0               # of the schedule it runs
    bench: tuple = ()             # (paper, method, arch) of the bench case timing its step

    def command(self):
        if self.launcher == "torchrun":
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}",
                    *self.argv]
        return [sys.executable, *self.argv]

    def shell_line(self):
        return f"(cd {shlex.quote(os.path.relpath(self.cwd, REPO))} && {shlex.join(self.command())})"

    def finished(self):
        return os.path.exists(os.path.join(self.run_dir, FINISHED_NAME))


def synthetic_root(out, create=True):
    root = os.path.join(out, "synthetic-data")
    if create and not os.path.exists(os.path.join(root, "imagenet")):
        write_cifar(root, "cifar10")
        write_cifar(root, "cifar100")
        write_imagefolder(os.path.join(root, "imagenet"))
    return root


def is_imagenet(argv):
    return any("imagenet" in str(a).lower() for a in argv)


def table_jobs(table, scale, seeds, out, data_root, nproc, create=True):
    """The distinct runs of TABLE at SCALE: rows with the same command and seed share one run."""
    jobs = {}
    for row in table.rows:
        extra = tuple(row.scale_args.get(scale, ())) if scale != "full" else ()
        root = data_root
        if scale == "smoke":
            root = synthetic_root(out, create)
            if row.launcher == "torchrun" or is_imagenet(row.argv):
                root = os.path.join(root, "imagenet")
            extra += ("--quiet",)
        for seed in seeds:
            key = (row.workdir, row.launcher, tuple(row.argv) + extra, seed)
            if key not in jobs:
                run_dir = os.path.abspath(os.path.join(out, table.id, scale, slug(row.name), f"seed{seed}"))
                argv = list(row.argv) + list(extra) + ["--run-dir", run_dir, "--seed", str(seed), "--data-root", root,
                                                       "--resume"]
                jobs[key] = Job(row.name, os.path.join(REPO, row.workdir), argv, run_dir, row.launcher,
                                nproc if scale != "smoke" else 1, epochs=flag_value(argv, EPOCH_FLAGS, row.epochs),
                                bench=(row.workdir, *row.bench) if row.bench else ())
            jobs[key].rows.append({"table": table.id, "row": row.name})
    return list(jobs.values())


def smoke_jobs(out, create=True):
    root = synthetic_root(out, create)
    jobs = []
    for run in all_smoke_runs():
        data = os.path.join(root, "imagenet") if run.dataset == "imagenet" else root
        run_dir = os.path.abspath(os.path.join(out, "smoke", run.workdir, slug(run.name)))
        argv = list(run.argv) + ["--quiet", "--run-dir", run_dir, "--seed", "1", "--data-root", data, "--resume"]
        rows = [{"table": t, "row": r} for t, r in getattr(run, "rows", ())]
        jobs.append(Job(run.name, os.path.join(REPO, run.workdir), argv, run_dir, run.launcher, run.nproc, rows))
    return jobs


# ------------------------------------------------------------------------------------------------ plan ----
EPOCH_FLAGS = ("--epochs", "--num_epochs", "--n_epochs")
TRAIN_IMAGES = {"cifar": 50_000, "imagenet": 1_281_167}
# The stated reference when no measured throughput is given: a V100-class GPU sustains about 10 TFLOP/s of fp32
# training on large networks (3x the forward FLOPs per image) and no more than about 10,000 CIFAR images/s on small
# ones, whatever their FLOPs (loader and launch bound). A rough model, for an order of magnitude before starting.
REFERENCE_TFLOPS, REFERENCE_MAX_IMAGES_PER_S = 10.0, 10_000.0
# forward_flops_per_image of every bench case a table row names, counted once (tests/test_common_reproduce.py checks
# that it covers every row and recounts a few); a case missing from it is counted and cached under the runs folder
FORWARD_FLOPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forward_flops.json")


def flag_value(argv, flags, default):
    """The int value of the last of FLAGS in ARGV (argparse keeps the last one), else DEFAULT."""
    value = default
    for i, a in enumerate(argv[:-1]):
        if a in flags:
            value = int(argv[i + 1])
    return value


def images_per_epoch(job):
    steps = flag_value(job.argv, ("--steps-per-epoch",), 0)
    if steps:
        return steps * flag_value(job.argv, ("--batch_size", "--batch-size", "--train_batch_size"), 128)
    return TRAIN_IMAGES["imagenet" if is_imagenet(job.argv) else "cifar"]


def throughput(jobs, measured, cache_path):
    """Images/s per bench case: measured (bench JSON rows: end-to-end where present) or the reference model."""
    from common import bench
    found = {}
    for row in measured:
        found[(row["paper"], row["method"], row["arch"])] = row.get("e2e_images_per_s") or row["train_images_per_s"]
    with open(FORWARD_FLOPS) as f:
        known = json.load(f)
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
    cases = {(c.paper, c.method, c.arch): c for c in bench.all_cases()}
    rates = {}
    for job in jobs:
        key = tuple(job.bench)
        if not key or key in rates:
            continue
        if key in found:
            rates[key] = (found[key], "measured")
            continue
        if key not in cases:
            continue
        name = "|".join(key)
        if name not in known and name not in cache:
            cache[name] = forward_flops_per_image(cases[key])
        flops = 3 * known.get(name, cache.get(name))
        rates[key] = (min(REFERENCE_TFLOPS * 1e12 / flops, REFERENCE_MAX_IMAGES_PER_S), "reference")
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    with open(cache_path, "w") as f:
        json.dump(cache, f)
    return rates


def forward_flops_per_image(case):
    """Forward FLOPs per image of every network the case trains (torch's FLOP counter, on the CPU)."""
    import torch
    from common import bench
    built = case.build(fast=bench.Fast(), batch=2)
    x = torch.randn(2, 3, built.input_size, built.input_size)
    return sum(bench.forward_flops(m, x) for m in (built.models or [built.deployed]))


def plan(jobs, seeds_note, measured, cache_path):
    """Lines of the cost of JOBS: per run its epochs, images and GPU-hours, then the total."""
    rates = throughput(jobs, measured, cache_path)
    lines, total_images, total_hours, unknown = [], 0, 0.0, 0
    for job in jobs:
        images = job.epochs * images_per_epoch(job)
        rate = rates.get(tuple(job.bench))
        gpus = job.nproc if job.launcher == "torchrun" else 1
        hours = images / rate[0] / 3600 * gpus if rate else None
        total_images += images
        if hours is None:
            unknown += 1
        else:
            total_hours += hours
        lines.append(f"  {job.epochs:4d} epochs  {images / 1e6:9.2f} M images  "
                     + (f"{hours:8.1f} GPU-h ({rate[1]})" if hours is not None else "       ? GPU-h (no bench case)")
                     + f"  {os.path.relpath(job.run_dir, REPO)}")
    sources = {r[1] for r in rates.values()}
    how = "measured throughput" if sources == {"measured"} else \
        f"the reference model ({REFERENCE_TFLOPS:g} TFLOP/s, at most {REFERENCE_MAX_IMAGES_PER_S:,.0f} images/s per GPU)" \
        + (" where no measurement was given" if "measured" in sources else "")
    lines.append(f"{len(jobs)} distinct runs{seeds_note}, {sum(j.epochs for j in jobs)} epochs, "
                 f"{total_images / 1e6:.1f} M images, about {total_hours:.0f} GPU-hours from {how}"
                 + (f"; {unknown} run(s) without an estimate" if unknown else ""))
    return lines


# ------------------------------------------------------------------------------------------- execution ----
def _run_script(cwd, argv, env, log_path):
    """In a process forked from the server: run ARGV[0] as `python ARGV...` would, in CWD."""
    # The fork inherits the server's signal wake-up pipe: a signal caught here (the run's SIGTERM handler, in its
    # loader workers too) would be written into the server's pipe and break its bookkeeping of exit statuses.
    signal.set_wakeup_fd(-1)
    os.chdir(cwd)
    os.environ.update(env)
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


class Launcher:
    """Starts jobs: python-launcher jobs in processes forked from a server that imported torch once, torchrun jobs
    as subprocesses. Keeps track of what runs, so Ctrl-C can stop everything."""

    PRELOAD = ["torch", "torchvision", "common.loop", "common.data"]

    def __init__(self):
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(self.PRELOAD)
        self.running = set()
        self.lock = threading.Lock()

    def run(self, job, env=None, log_path=None):
        """Run JOB to its end; returns its exit status."""
        env = dict(env or {}, PYTHONUNBUFFERED="1")
        if job.launcher == "python":
            proc = self.context.Process(target=_run_script, args=(job.cwd, job.argv, env, log_path))
            with self.lock:
                proc.start()
                self.running.add(proc)
            proc.join()
            with self.lock:
                self.running.discard(proc)
            return proc.exitcode
        out = open(log_path, "a") if log_path else None
        try:
            with self.lock:
                proc = subprocess.Popen(job.command(), cwd=job.cwd, env=dict(os.environ, **env), stdout=out,
                                        stderr=subprocess.STDOUT if out else None, start_new_session=True)
                self.running.add(proc)
            code = proc.wait()
        finally:
            with self.lock:
                self.running.discard(proc)
            if out:
                out.close()
        return code

    def stop_all(self):
        with self.lock:
            for proc in list(self.running):
                try:
                    if isinstance(proc, subprocess.Popen):
                        os.killpg(proc.pid, signal.SIGTERM)
                    else:
                        proc.terminate()
                except (OSError, AttributeError):
                    pass


def write_rows(job):
    os.makedirs(job.run_dir, exist_ok=True)
    with open(os.path.join(job.run_dir, ROWS_FILE), "w") as f:
        json.dump(job.rows, f, indent=1)


def outcome(code, was_finished):
    if code == 0:
        return "finished already" if was_finished else "done"
    return f"failed (exit {code})" if code > 0 else f"killed (signal {-code})"


def run_local(jobs, launcher, parallel=1, gpus=None):
    """Run JOBS here, PARALLEL at once, each pinned to its GPUs from GPUS (a list of ids) when given.
    Returns [(job, outcome, seconds)] in the order of JOBS."""
    free = list(gpus or [])
    free_lock = threading.Condition()
    total = len(jobs)
    results = [None] * total

    def one(i, job):
        need = job.nproc if job.launcher == "torchrun" else 1
        mine = []
        if gpus:
            with free_lock:
                free_lock.wait_for(lambda: len(free) >= need)
                mine, free[:] = free[:need], free[need:]
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, mine))} if gpus else {}
        log = os.path.join(job.run_dir, OUTPUT_LOG) if parallel > 1 else None
        was_finished = job.finished()
        write_rows(job)
        where = f" on GPU {','.join(map(str, mine))}" if mine else ""
        print(f"[{i + 1}/{total}] start{where}: {job.name} ({os.path.relpath(job.run_dir, REPO)})"
              + (f", output in {OUTPUT_LOG}" if log else ""), flush=True)
        start = time.time()
        code = launcher.run(job, env, log)
        seconds = time.time() - start
        with free_lock:
            free.extend(mine)
            free_lock.notify_all()
        results[i] = (job, outcome(code, was_finished), seconds)
        print(f"[{i + 1}/{total}] {results[i][1]} in {seconds:.0f}s: {job.name}", flush=True)

    if parallel <= 1:
        for i, job in enumerate(jobs):
            one(i, job)
    else:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            for future in [pool.submit(one, i, job) for i, job in enumerate(jobs)]:
                future.result()
    return results


class SlurmTask:
    """One array task: run the job's command; when SLURM pre-empts it or its time runs out, submitit calls
    checkpoint(): the run is stopped (its last checkpoint is on disk) and the task requeued, to resume there."""

    def __init__(self, job):
        self.job = job
        self.proc = None

    def __call__(self):
        write_rows(self.job)
        with open(os.path.join(self.job.run_dir, OUTPUT_LOG), "a") as out:
            self.proc = subprocess.Popen(self.job.command(), cwd=self.job.cwd, stdout=out, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
            code = self.proc.wait()
        if code != 0:
            raise RuntimeError(f"{self.job.name}: exit {code} (see {os.path.join(self.job.run_dir, OUTPUT_LOG)})")
        return self.job.run_dir

    def checkpoint(self, *args, **kwargs):
        import submitit
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        return submitit.helpers.DelayedSubmission(SlurmTask(self.job))


def run_slurm(jobs, args, folder):
    try:
        import submitit
    except ImportError:
        raise SystemExit("--slurm needs submitit: pip install submitit")
    executor = submitit.AutoExecutor(folder=os.path.join(folder, "submitit", "%j"))
    if executor.cluster != "slurm":
        print("no SLURM found here: the array runs on submitit's local executor", flush=True)
    params = {"timeout_min": args.time_minutes, "gpus_per_node": args.gpus_per_job, "tasks_per_node": 1,
              "cpus_per_task": args.cpus_per_task}
    if executor.cluster == "slurm":
        params.update(slurm_partition=args.partition, slurm_array_parallelism=args.jobs or len(jobs),
                      slurm_signal_delay_s=120)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    submitted = executor.submit_array([SlurmTask(job) for job in jobs]) if hasattr(executor, "submit_array") else \
        [executor.submit(SlurmTask(job)) for job in jobs]
    print(f"submitted {len(submitted)} task(s) (job {submitted[0].job_id.split('_')[0]}); waiting", flush=True)
    results = []
    for i, (job, task) in enumerate(zip(jobs, submitted)):
        start = time.time()
        try:
            task.result()
            state = "done"
        except Exception as e:  # noqa: BLE001 - one failed task never stops the others
            state = f"failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        results.append((job, state, time.time() - start))
        print(f"[{i + 1}/{len(jobs)}] {state}: {job.name}", flush=True)
    return results


def time_minutes(text):
    h, _, m = text.partition(":")
    try:
        return int(h) * 60 + int(m or 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--time {text!r}: expected HH:MM")


# ------------------------------------------------------------------------------------------------ main ----
def get_args_parser():
    parser = argparse.ArgumentParser(prog="bash reproduce.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", help="'list', 'smoke', or a table id such as table3")
    parser.add_argument("--scale", choices=("smoke", "short", "full"), default="full")
    parser.add_argument("--seeds", default=None, help='seeds, e.g. "1 2 3" (default: the table\'s own)')
    parser.add_argument("--out", default=os.path.join(REPO, "runs"))
    parser.add_argument("--data-root", default=None,
                        help="folder with cifar-*-python/ (CIFAR tables) or train/ and val/ (ImageNet tables); "
                             "default $DATA_ROOT, else <repository>/data")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per torchrun launch")
    parser.add_argument("--dry-run", action="store_true", help="print every command (or what would be submitted)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (--slurm: array tasks at once)")
    parser.add_argument("--gpus", default=None, help="GPU ids to spread the runs over, e.g. 0,1,2,3")
    parser.add_argument("--slurm", action="store_true", help="submit a job array through submitit")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per array task (ImageNet: --nproc)")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per array task")
    parser.add_argument("--time", dest="time_minutes", type=time_minutes, default=24 * 60,
                        help="time limit per task, HH:MM (the task requeues itself when it is reached)")
    parser.add_argument("--plan", action="store_true",
                        help="print the distinct runs, their epochs, images and estimated GPU-hours; run nothing")
    parser.add_argument("--bench-json", default=None,
                        help="measured throughput for --plan (python -m common.bench --device cuda --json FILE)")
    return parser


def summary(results, seconds):
    failed = [(j, s) for j, s, _ in results if s.startswith(("failed", "killed"))]
    print()
    for job, state, took in results:
        print(f"  {state:<18} {took:7.0f}s  {job.name}")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    print(f"total {seconds:.0f}s")
    for job, state in failed:
        print(f"  {state}: {job.shell_line()}", file=sys.stderr)
    return failed


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    from common.options import default_data_root
    data_root = os.path.abspath(args.data_root or default_data_root())
    if args.jobs < 1 or args.nproc < 1:
        parser.error("--jobs and --nproc must be >= 1")
    gpus = [g for g in args.gpus.split(",") if g] if args.gpus else None

    measured = []
    if args.bench_json:
        with open(args.bench_json) as f:
            measured = json.load(f)
    cache = os.path.join(out, ".plan-flops.json")
    if args.what == "list":
        for t in all_tables():
            jobs = table_jobs(t, "full", t.seeds, out, data_root, 1, create=False)
            print(f"{t.id:8s} {t.title}  [{t.source}]  ({len(t.rows)} rows)")
            print("   " + plan(jobs, f" ({len(t.seeds)} seed(s))", measured, cache)[-1])
        return 0
    if args.what == "smoke":
        jobs = smoke_jobs(out, create=not args.dry_run)
        compare_dir = os.path.join(out, "smoke")
    else:
        try:
            table = find_table(args.what)
        except KeyError as e:
            print(e.args[0], file=sys.stderr)
            return 2
        seeds = [int(s) for s in args.seeds.split()] if args.seeds else list(table.seeds)
        jobs = table_jobs(table, args.scale, seeds, out, data_root, args.nproc, create=not args.dry_run)
        compare_dir = os.path.join(out, table.id, args.scale)
    if args.plan:
        seeds_note = "" if args.what == "smoke" else f" ({len(seeds)} seed(s), scale {args.scale})"
        print("\n".join(plan(jobs, seeds_note, measured, cache)))
        return 0
    if args.dry_run:
        if args.slurm:
            print(f"would submit {len(jobs)} array task(s), {args.gpus_per_job} GPU(s) and "
                  f"{args.time_minutes} min each" + (f" on partition {args.partition}" if args.partition else "") + ":")
        for job in jobs:
            print(job.shell_line())
        return 0

    start = time.time()
    launcher = Launcher()
    try:
        if args.slurm:
            results = run_slurm(jobs, args, compare_dir)
        else:
            results = run_local(jobs, launcher, args.jobs, gpus)
    except KeyboardInterrupt:
        launcher.stop_all()
        print(f"\ninterrupted: run `bash reproduce.sh {' '.join(argv if argv is not None else sys.argv[1:])}` "
              f"again to continue (finished runs are kept, the others resume from their last checkpoint)",
              file=sys.stderr)
        return 130
    failed = summary(results, time.time() - start)
    if args.what == "smoke":
        print("The smoke ran every method of every paper for a few steps on synthetic data through the real scripts, "
              "loaders, checkpoints and comparison; its accuracies mean nothing.")
    if os.path.isdir(compare_dir):
        print()
        compare_main([compare_dir] + (["--include-synthetic"] if args.what == "smoke" or args.scale == "smoke"
                                      else []))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
