"""One command that measures a GPU: `bash reproduce.sh gpu-check` (or `python -m common.gpu_check`).

    bash reproduce.sh gpu-check [--device cuda] [--out runs/gpu-check] [--data-root DIR]
    bash reproduce.sh gpu-check --device cpu --tiny          # the same path in seconds (the tests run it)

1. Throughput, faithful and with --fast (what --fast means on the device: common.fast), through common.bench: the
   training step's images/s, the end-to-end images/s through each script's own train loader, peak memory, page
   faults and allocations per step, for every CIFAR ResNet-32 method of the four papers, the DCM WRN-28-10 pair at
   the released batch 128, and L-MCL with its meta step (reported as a multiple of an ordinary step).
2. Learning, faithful and with --fast: OKDDip's baseline ResNet-32 (okddip/train.py) for a few epochs on a
   CIFAR-10 folder found on the machine (--data-root, $DATA_ROOT or <repository>/data, real data only), else on
   scikit-learn's digits written in CIFAR-10's format (common.digits), and both test accuracies.
3. One JSON and one markdown table with the device, torch version and date, under --out.

Built to end within about 8 minutes on one GPU: the throughput cases run in order of interest until --budget seconds
(300) are spent, and the ones not reached are reported as skipped; the learning check takes about two more minutes
(estimated: no GPU has run this command yet).

It imports and runs without tensorboardX, tqdm or matplotlib (an older torch is fine too): missing optional packages
only mean fewer side files.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from common import bench
from common.data import CIFAR_ARCHIVES, data_kind
from common.options import REPO, default_data_root

# (paper, method or None for all, arch): the cases measured
# (paper, method or None for all, arch): the cases measured, the most telling first (a spent --budget skips the rest)
FULL = [("okddip", "baseline", "resnet32"), ("okddip", "okddip", "resnet32"), ("ffsd", None, "resnet32"),
        ("mcl", "L-MCL", "resnet32"), ("dcm", "dcm", "wrn-28-10|wrn-28-10"), ("mcl", "baseline", "resnet32"),
        ("okddip", "kd", "resnet32"), ("okddip", "dml", "resnet32"), ("okddip", "one", "resnet32"),
        ("okddip", "cl-ilr", "resnet32"), ("okddip", "ind", "resnet32"), ("okddip", "okddip-network", "resnet32")]
TINY = [("okddip", "baseline", "resnet32"), ("okddip", "okddip", "resnet32"), ("ffsd", None, "resnet32"),
        ("mcl", "L-MCL", "resnet32"), ("dcm", "dcm", "wrn-16-2|wrn-16-2")]


def selected_cases(tiny):
    chosen = []
    for paper, method, arch in (TINY if tiny else FULL):
        matches = [c for c in bench.all_cases() if c.paper == paper and c.arch == arch and
                   (method is None or c.method == method)]
        if not matches:
            raise SystemExit(f"gpu-check: no bench case {paper} {method or '(every method)'} {arch}")
        chosen += matches
    return chosen


def bench_args(device, fast, tiny):
    parser = argparse.ArgumentParser()
    bench.add_fast_args(parser)
    args = parser.parse_args(["--fast"] if fast else [])
    args.device, args.batch = device, (4 if tiny else 128)
    args.steps, args.warmup = (2, 1) if tiny else (10, 3)
    args.workers, args.no_e2e, args.data_root, args.imagenet_root = (0 if tiny else None), False, None, None
    return args


def cifar10_root(data_root):
    """A real CIFAR-10 folder under DATA_ROOT, or None."""
    folder = os.path.join(data_root, CIFAR_ARCHIVES["cifar10"][0])
    return data_root if os.path.isdir(folder) and data_kind(data_root) == "real" else None


def learning(out, device, data_root, tiny):
    """okddip/train.py baseline ResNet-32, faithful and --fast; returns {mode: record of its last epoch}."""
    root = None if tiny else cifar10_root(data_root)
    source = "CIFAR-10 (real)"
    if root is None:
        from common.digits import write_digits
        root = os.path.join(out, "digits")
        if not os.path.isdir(os.path.join(root, CIFAR_ARCHIVES["cifar10"][0])):
            write_digits(root)
        source = "scikit-learn digits in CIFAR-10 format"
    epochs = ["--num_epochs", "1", "--steps-per-epoch", "3", "--eval-batches", "2", "--batch_size", "16"] if tiny \
        else ["--num_epochs", "5", "--schedule", "3", "4"]
    results = {}
    for mode, extra in (("faithful", []), ("fast", ["--fast"])):
        run_dir = os.path.join(out, f"learning-{mode}")
        cmd = [sys.executable, "train.py", "--dataset", "CIFAR10", "--model", "resnet32", "--data-root", root,
               "--run-dir", run_dir, "--device", str(device), "--quiet", "--seed", "0", "--overwrite",
               "--num_workers", "0" if tiny else "8", *epochs, *extra]
        start = time.time()
        proc = subprocess.run(cmd, cwd=os.path.join(REPO, "okddip"), capture_output=True, text=True)
        if proc.returncode != 0:
            results[mode] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
            continue
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            last = [json.loads(line) for line in f if line.strip()][-1]
        results[mode] = {"epochs": last["epoch"], "test_top1": last.get("test/net/top1"),
                         "seconds": time.time() - start}
    return source, results


def markdown(report):
    lines = [f"# GPU check: {report['device_name']}", "",
             f"torch {report['torch']}, {report['date']}, {report['seconds']:.0f} s in total.", "",
             "| paper | method | arch | batch | faithful train img/s | fast train img/s | faithful e2e img/s | "
             "fast e2e img/s | faithful peak MB | fast peak MB | other steps (faithful) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    for row in report["throughput"]:
        a, b = row["faithful"] or {}, row["fast"] or {}
        lines.append(f"| {row['paper']} | {row['method']} | {row['arch'].replace('|', chr(92) + '|')} | {fmt(a.get('batch'), 'd')} | "
                     f"{fmt(a.get('train_images_per_s'))} | {fmt(b.get('train_images_per_s'))} | "
                     f"{fmt(a.get('e2e_images_per_s'))} | {fmt(b.get('e2e_images_per_s'))} | "
                     f"{fmt(a.get('peak_memory_mb'), '.0f')} | {fmt(b.get('peak_memory_mb'), '.0f')} | "
                     f"{bench._ratios(a) if a else row.get('faithful_error', 'failed')} |")
    lines += ["", f"Learning check ({report['learning_data']}): OKDDip baseline ResNet-32, okddip/train.py.", "",
              "| mode | epochs | test top-1 | seconds |", "|---|---:|---:|---:|"]
    for mode, r in report["learning"].items():
        if "error" in r:
            lines.append(f"| {mode} | - | failed: {' '.join(r['error'])} | - |")
        else:
            lines.append(f"| {mode} | {r['epochs']} | {fmt(r['test_top1'], '.2f')} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bash reproduce.sh gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "gpu-check"))
    parser.add_argument("--data-root", default=None, help="where to look for a real CIFAR-10 folder (default "
                                                          "$DATA_ROOT, else <repository>/data)")
    parser.add_argument("--tiny", action="store_true", help="batch 4, two timed steps, a few training steps")
    parser.add_argument("--budget", type=float, default=300, help="seconds of throughput measurements; the cases "
                                                                   "not reached by then are reported as skipped, and "
                                                                   "the learning check (about two minutes) follows")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (--device cpu --tiny checks the command)")
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    rows = []
    for case in selected_cases(args.tiny):
        row = {"paper": case.paper, "method": case.method, "arch": case.arch}
        for mode in ("faithful", "fast"):
            if time.time() - start > args.budget:
                row[mode], row[f"{mode}_error"] = None, f"skipped: the --budget of {args.budget:.0f} s was spent"
                continue
            print(f"{case.paper} {case.method} {case.arch}: {mode} ...", flush=True)
            try:
                row[mode] = bench.measure(case, bench_args(args.device, mode == "fast", args.tiny))
            except Exception as e:  # noqa: BLE001 - one case that cannot run is reported, the others go on
                row[mode] = None
                row[f"{mode}_error"] = f"{type(e).__name__}: {e}"
                print(f"  failed: {row[f'{mode}_error']}", flush=True)
        rows.append(row)
    source, learned = learning(args.out, args.device, args.data_root or default_data_root(), args.tiny)
    report = {"device": str(args.device), "device_name": bench.device_name(args.device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "tiny": args.tiny, "throughput": rows,
              "learning_data": source, "learning": learned, "seconds": time.time() - start}
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"written: {os.path.join(args.out, 'gpu_check.json')}, {os.path.join(args.out, 'gpu_check.md')}")
    failed = [r for r in rows for mode in ("faithful", "fast") if r[mode] is None and
              not r[f"{mode}_error"].startswith("skipped")] + [m for m, r in learned.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
