"""Throughput and memory of every method's training step, measured (never asserted in tests).

    python -m common.bench [--method M ...] [--arch A ...] [--device cpu|cuda] [--batch 128] [--steps 20]
                           [--warmup 3] [--fast] [--data-root DIR] [--imagenet-root DIR] [--workers N]
                           [--no-e2e] [--json out.json]
    python -m common.bench --compare A.json B.json

Each subproject declares its cases in `<paper>/bench.py` as `CASES`: a list of `BenchCase`s whose `build(fast,
batch)` returns a `Built` (from the training script's own Run, on the Fast value's device and options): `step(x, y)`
runs one full training iteration of the method (forward of every network, every loss term, backward, optimizer
step), `deployed` is the network that would be deployed, `models` every trained module (for the parameter count),
`extra_steps` other steps of the method ({"meta": ...}: L-MCL's meta iteration), timed as multiples of `step`; on the
CPU, an extra step's named phases (profiler ranges "phase: ...") are reported too, each as its share of that multiple
with its convolutions, convolution backwards and batch norms (`step_phases`) beside the ordinary step's
(`ordinary_step_calls`).
Measured per case: training-step images/s on in-memory batches (median over --steps after --warmup), evaluation
images/s of the deployed network, peak memory (CUDA max allocated, or the process's peak RSS on the CPU), minor page
faults and allocated MB per training step (the operator outputs that need new memory), forward FLOPs per image of
the deployed network (torch's FLOP counter) and the achieved training FLOP rate (3x forward FLOPs of all trained
networks as an estimate of forward+backward).

End-to-end throughput ("e2e img/s") feeds the same step from the training script's own train loader (its dataset
class, transforms, sampler, workers and pin_memory, or the device-resident loader with --data-on-device): images/s
over --steps batches after --warmup, i.e. the steady state of an epoch. The data are the real ones under --data-root
(CIFAR) or --imagenet-root when given, else a synthetic dataset written in the real on-disk format to a temporary
folder (CIFAR pickles; for ImageNet, 448x448 JPEGs, a little larger than ImageNet's average, so decoding costs about
what it costs on the real set).
--workers overrides the scripts' loader workers (default: each script's own default).
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from common.fast import Fast, add_fast_args
from common.results import paper_modules


@dataclass
class Built:
    step: Callable                  # step(x, y): one training iteration
    deployed: torch.nn.Module       # the network a user would deploy
    # every trained module, each callable on an image batch (parameter count, and FLOPs of the training step):
    # modules fed with features rather than images (fusion modules, decoders) are wrapped with their producers.
    models: list = field(default_factory=list)
    input_size: int = 32
    num_classes: int = 100
    # further iterations of the method worth timing beside the ordinary step, e.g. {"meta": callable(x, y)}: the
    # row reports each one's time as a multiple of the ordinary step
    extra_steps: dict = field(default_factory=dict)


@dataclass
class BenchCase:
    paper: str
    method: str
    arch: str
    build: Callable                 # build(fast, batch) -> Built
    # train_loader(data_root, fast, batch, workers) -> the training script's own train loader (None: no end-to-end
    # figure); workers None means the script's default
    train_loader: Callable = None
    dataset: str = "cifar100"       # the data the loader reads: cifar10 | cifar100 | imagenet


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _AllocationCounter(TorchDispatchMode):
    """Bytes of every operator output that does not reuse an input's storage (in-place ops and views allocate
    nothing): the memory the allocator is asked for."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


PHASE = "phase: "  # the prefix of the profiler ranges (torch.profiler.record_function) a step names its phases by
# the operators a phase is counted in: a pass of a network is one call of each of its convolutions and batch norms
COUNTED = ("aten::convolution", "aten::convolution_backward", "aten::batch_norm")


def _profiled_events(fn):
    """(name, start ns, end ns) of every operator and range of one call of FN on the CPU, by start. Read from the
    profiler's raw results: building its Python events for the 300 thousand operator calls of a meta step takes
    longer than the step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    return sorted(((e.name(), e.start_ns(), e.start_ns() + e.duration_ns()) for e in events), key=lambda e: e[1])


def operator_calls(fn):
    """The calls of each COUNTED operator in one call of FN."""
    names = [name for name, _, _ in _profiled_events(fn)]
    return [names.count(op) for op in COUNTED]


def phases(fn, ratio):
    """Where one call of FN (an extra step, RATIO ordinary steps long) goes: {range name: [its share of RATIO, then
    the calls of each COUNTED operator inside it]} for every range named PHASE... in FN, in the order they first ran
    (ranges of one name summed). The shares come from one profiled call (the profiler's own cost per operator spread
    over the whole call); what FN does outside the ranges is its rest."""
    events = _profiled_events(fn)
    whole = max(end for _, _, end in events) - min(start for _, start, _ in events)
    found = {}
    for name, start, end in events:
        if name.startswith(PHASE):
            inside = [n for n, s, e in events if start <= s and e <= end]
            row = found.setdefault(name[len(PHASE):], [0.0] + [0] * len(COUNTED))
            row[0] += ratio * (end - start) / whole
            for i, op in enumerate(COUNTED, 1):
                row[i] += inside.count(op)
    return found


def allocated_mb(fn):
    """MiB allocated by the operators of one call of FN, freed or not (see _AllocationCounter)."""
    counter = _AllocationCounter()
    with counter:
        fn()
    return counter.bytes / 2**20


def all_cases():
    return [case for module in paper_modules("bench") for case in module.CASES]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_name(device):
    """The device in words, for the tables: the GPU's name, or the CPU model with its cores and torch threads."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _peak_memory_mb(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed(fn, n, device):
    times = []
    for _ in range(n):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic_root(dataset, images, folder):
    """Write a synthetic DATASET with at least IMAGES training images under FOLDER; returns the data root."""
    from common.synthetic import write_cifar, write_imagefolder
    if dataset == "imagenet":
        classes = 10
        return write_imagefolder(os.path.join(folder, "imagenet"), num_classes=classes,
                                 train_per_class=math.ceil(images / classes), val_per_class=1, size=448)
    classes = 10 if dataset == "cifar10" else 100
    write_cifar(folder, dataset, train_per_class=math.ceil(images / classes), test_per_class=1)
    return folder


def end_to_end(case, built, fast, args):
    """Images/s of the step fed by the script's own train loader (steady state: --steps batches after --warmup)."""
    with tempfile.TemporaryDirectory() as tmp:
        real = args.imagenet_root if case.dataset == "imagenet" else args.data_root
        root = real or synthetic_root(case.dataset, args.batch * (args.warmup + args.steps), tmp)
        loader = case.train_loader(root, fast=fast, batch=args.batch, workers=args.workers)
        done, start = 0, time.perf_counter()
        while done < args.warmup + args.steps:  # a small synthetic set may take more than one pass
            for x, y in loader:  # timed from the end of the warm-up: fetching a batch counts
                x, y = fast.inputs(x, y)
                built.step(x, y)
                done += 1
                if done == args.warmup:
                    _sync(args.device)
                    start = time.perf_counter()
                if done == args.warmup + args.steps:
                    break
        _sync(args.device)
        return args.steps * args.batch / (time.perf_counter() - start)


def forward_flops(model, x):
    from torch.utils.flop_counter import FlopCounterMode
    model = getattr(model, "_orig_mod", model)  # count on the plain module, not a torch.compile wrapper
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / x.size(0)


def measure(case, args):
    fast = Fast.from_args(args, args.device)
    device = fast.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    built = case.build(fast=fast, batch=args.batch)
    x, y = fast.inputs(torch.randn(args.batch, 3, built.input_size, built.input_size),
                       torch.randint(0, built.num_classes, (args.batch,)))
    for _ in range(args.warmup):
        built.step(x, y)
    faults = minor_faults()
    step_s = _timed(lambda: built.step(x, y), args.steps, device)
    faults_per_step = (minor_faults() - faults) / args.steps
    alloc_mb = None if fast.compile else allocated_mb(lambda: built.step(x, y))  # compiled code is not dispatched
    ratios, step_phases = {}, {}
    for name, fn in built.extra_steps.items():
        fn(x, y)  # warm-up
        ratios[name] = _timed(lambda: fn(x, y), max(1, args.steps // 5), device) / step_s
        if device.type == "cpu":  # where an extra step's time goes, by its named phases
            step_phases[name] = phases(lambda: fn(x, y), ratios[name])
    ordinary_calls = operator_calls(lambda: built.step(x, y)) if step_phases else None
    built.deployed.eval()

    def evaluate():
        with torch.no_grad(), fast.autocast():
            built.deployed(x)

    for _ in range(args.warmup):
        evaluate()
    eval_s = _timed(evaluate, args.steps, device)
    peak_mb = _peak_memory_mb(device)  # of the step and the evaluation, before a loader adds its dataset
    flops = forward_flops(built.deployed, x[:2].float().contiguous())
    trained_flops = sum(forward_flops(m, x[:2].float().contiguous()) for m in built.models) if built.models else flops
    built.deployed.train()
    e2e = end_to_end(case, built, fast, args) if case.train_loader is not None and not args.no_e2e else None
    return {"paper": case.paper, "method": case.method, "arch": case.arch, "device": str(device),
            "batch": args.batch, "fast": bool(args.fast), "train_images_per_s": args.batch / step_s,
            "e2e_images_per_s": e2e, "workers": args.workers,
            "eval_images_per_s": args.batch / eval_s, "peak_memory_mb": peak_mb,
            "minor_faults_per_step": faults_per_step, "allocated_mb_per_step": alloc_mb, "step_ratios": ratios,
            "step_phases": step_phases, "ordinary_step_calls": ordinary_calls,
            "deployed_gflops_per_image": flops / 1e9,
            "train_tflops_per_s": 3 * trained_flops * args.batch / step_s / 1e12,
            "parameters": sum(p.numel() for m in (built.models or [built.deployed]) for p in m.parameters()),
            "steps": args.steps, "warmup": args.warmup, "device_name": device_name(device),
            "options": {k: getattr(fast, k) for k in ("data_on_device", "amp", "channels_last", "compile")},
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def _ratios(r):
    return ", ".join(f"{k} {v:.1f}x" for k, v in (r.get("step_ratios") or {}).items()) or "-"


def _mb(r):
    return r.get("allocated_mb_per_step") or float("nan")


def print_table(rows):
    head = f"{'paper':7s} {'method':16s} {'arch':22s} {'train img/s':>11s} {'e2e img/s':>9s} {'eval img/s':>10s} " \
           f"{'peak MB':>9s} {'faults/step':>11s} {'alloc MB/step':>13s} {'GFLOP/img':>9s} {'TFLOP/s':>8s}  other steps"
    print(head)
    print("-" * len(head))
    for r in rows:
        e2e = f"{r['e2e_images_per_s']:9.1f}" if r.get("e2e_images_per_s") else f"{'-':>9s}"
        print(f"{r['paper']:7s} {r['method']:16s} {r['arch']:22s} {r['train_images_per_s']:11.1f} {e2e} "
              f"{r['eval_images_per_s']:10.1f} {r['peak_memory_mb']:9.0f} {r.get('minor_faults_per_step', 0):11.0f} "
              f"{_mb(r):13.1f} {r['deployed_gflops_per_image']:9.3f} {r['train_tflops_per_s']:8.3f}  {_ratios(r)}")
    for r in rows:
        print_phases(r)


def print_phases(r):
    """The named phases of a row's extra steps: each one's time as a multiple of the ordinary step, and its calls of
    the COUNTED operators beside the ordinary step's."""
    for name, rows in (r.get("step_phases") or {}).items():
        print(f"\n{r['paper']} {r['method']} {r['arch']}: the {name} iteration, {r['step_ratios'][name]:.1f} ordinary "
              f"steps")
        print(f"  {'phase':58s} {'x step':>7s} " + " ".join(f"{op[6:]:>18s}" for op in COUNTED))
        print(f"  {'(the ordinary step)':58s} {1:7.2f} " + " ".join(f"{n:18d}" for n in r["ordinary_step_calls"]))
        for label, (ratio, *calls) in rows.items():
            print(f"  {label:58s} {ratio:7.2f} " + " ".join(f"{n:18d}" for n in calls))
        rest = r["step_ratios"][name] - sum(v[0] for v in rows.values())
        print(f"  {'rest (the ordinary step, updates, copies)':58s} {rest:7.2f}")


def markdown_table(rows):
    """The rows as a markdown table, headed by what they were measured on (device, torch, date, options)."""
    setups = sorted({(r["device_name"], r["torch"], r["date"], json.dumps(r["options"], sort_keys=True))
                     for r in rows})
    lines = []
    for name, version, date, options in setups:
        on = [k for k, v in json.loads(options).items() if v not in (False, "none")]
        lines.append(f"Measured on {name}, torch {version}, {date}; fast options: {', '.join(on) or 'none (faithful)'}.")
    lines += ["", "| paper | method | arch | batch | train img/s | e2e img/s | eval img/s | peak MB | minor faults/step "
                  "| alloc MB/step | GFLOP/img | train TFLOP/s | other steps |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        e2e = f"{r['e2e_images_per_s']:.1f}" if r.get("e2e_images_per_s") else "-"
        lines.append(f"| {r['paper']} | {r['method']} | {r['arch'].replace('|', chr(92) + '|')} | {r['batch']} | "
                     f"{r['train_images_per_s']:.1f} | {e2e} | {r['eval_images_per_s']:.1f} | "
                     f"{r['peak_memory_mb']:.0f} | {r.get('minor_faults_per_step', 0):.0f} | {_mb(r):.1f} | "
                     f"{r['deployed_gflops_per_image']:.3f} | {r['train_tflops_per_s']:.3f} | {_ratios(r)} |")
    return "\n".join(lines)


def compare_files(a, b):
    with open(a) as f:
        ra = {(r["paper"], r["method"], r["arch"]): r for r in json.load(f)}
    with open(b) as f:
        rb = {(r["paper"], r["method"], r["arch"]): r for r in json.load(f)}

    def ratio(x, y, key, width):
        if x.get(key) and y.get(key):
            return f"{y[key] / x[key]:{width}.2f}"
        return f"{'-':>{width}s}"

    print(f"{'paper':7s} {'method':16s} {'arch':22s} {'train B/A':>9s} {'e2e B/A':>9s} {'eval B/A':>9s} "
          f"{'mem B/A':>8s} {'faults B/A':>10s} {'alloc B/A':>9s}")
    for key in ra:
        if key in rb:
            x, y = ra[key], rb[key]
            print(f"{key[0]:7s} {key[1]:16s} {key[2]:22s} {ratio(x, y, 'train_images_per_s', 9)} "
                  f"{ratio(x, y, 'e2e_images_per_s', 9)} {ratio(x, y, 'eval_images_per_s', 9)} "
                  f"{ratio(x, y, 'peak_memory_mb', 8)} {ratio(x, y, 'minor_faults_per_step', 10)} "
                  f"{ratio(x, y, 'allocated_mb_per_step', 9)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", action="append", help="only these methods (repeatable)")
    parser.add_argument("--arch", action="append", help="only these architectures (repeatable)")
    parser.add_argument("--paper", action="append", help="only these papers (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--data-root", help="the real CIFAR folder for the end-to-end figure (default: synthetic, "
                                            "written in the real on-disk format to a temporary folder)")
    parser.add_argument("--imagenet-root", help="the real ImageNet folder (train/, val/) for the ImageNet cases")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: each script's own)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end (data pipeline) figure")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="ratio B/A per row")
    parser.add_argument("--list", action="store_true", help="list the cases")
    parser.add_argument("--markdown", nargs="*", metavar="JSON",
                        help="print a markdown table (of these JSON files, or of this run's measurements)")
    parser.add_argument("--case-index", type=int, default=None, help=argparse.SUPPRESS)
    add_fast_args(parser)
    args = parser.parse_args(argv)
    if args.compare:
        compare_files(*args.compare)
        return 0
    if args.markdown:
        rows = []
        for path in args.markdown:
            with open(path) as f:
                rows.extend(json.load(f))
        print(markdown_table(rows))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in all_cases() if (not args.method or c.method in args.method)
             and (not args.arch or c.arch in args.arch) and (not args.paper or c.paper in args.paper)]
    if args.list or not cases:
        for c in all_cases():
            print(f"{c.paper:7s} {c.method:16s} {c.arch}")
        if not cases:
            print("no case matches the filters", file=sys.stderr)
            return 2
        return 0
    if args.case_index is not None:  # child process: one case, result to --json
        rows = [measure(cases[args.case_index], args)]
        with open(args.json, "w") as f:
            json.dump(rows, f)
        return 0
    rows = []
    for i, case in enumerate(cases):
        print(f"measuring {case.paper} {case.method} {case.arch} ...", file=sys.stderr, flush=True)
        if len(cases) == 1:
            rows.append(measure(case, args))
            continue
        # Each case in its own process, so peak memory (a process-lifetime figure on the CPU) is the case's own.
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "row.json")
            argv_child = [a for a in (argv if argv is not None else sys.argv[1:])]
            if "--json" in argv_child:
                k = argv_child.index("--json")
                del argv_child[k:k + 2]
            code = subprocess.call([sys.executable, "-m", "common.bench", *argv_child, "--case-index", str(i),
                                    "--json", out])
            if code != 0:
                print(f"  failed (exit {code})", file=sys.stderr)
                continue
            with open(out) as f:
                rows.extend(json.load(f))
    print_table(rows)
    if args.markdown is not None and rows:
        print()
        print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
