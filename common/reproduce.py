"""What `bash reproduce.sh` runs.

    bash reproduce.sh list
    bash reproduce.sh table3 [--scale smoke|short|full] [--seeds "1 2 3"] [--out runs] [--data-root DIR] [--dry-run]
    bash reproduce.sh smoke [--out runs] [--dry-run]

Every run goes to OUT/<table>/<row>/seed<k>. A run with a `finished` marker is skipped; any other is started with
--resume, so an interrupted reproduction continues where it stopped when the command is run again. The comparison
with the published numbers is printed at the end. Scales: full = the published schedule; short = a tenth of the
epochs with the milestones scaled; smoke = a few iterations per row on synthetic data (CPU friendly).
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import time

from common.compare import main as compare_main
from common.logging import FINISHED_NAME
from common.results import all_smoke_runs, all_tables, find_table
from common.synthetic import write_cifar, write_imagefolder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def synthetic_root(out, create=True):
    root = os.path.join(out, "synthetic-data")
    if create and not os.path.exists(os.path.join(root, "imagenet")):
        write_cifar(root, "cifar10")
        write_cifar(root, "cifar100")
        write_imagefolder(os.path.join(root, "imagenet"))
    return root


def launcher(kind, nproc):
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable]


def command(workdir, argv, extra, run_dir, seed, data_root, kind="python", nproc=1):
    return {"cwd": os.path.join(REPO, workdir), "run_dir": run_dir,
            "argv": launcher(kind, nproc) + list(argv) + list(extra) +
            ["--run-dir", run_dir, "--seed", str(seed), "--data-root", data_root, "--resume"]}


def is_imagenet(argv):
    return any("imagenet" in str(a).lower() for a in argv)


def table_commands(table, scale, seeds, out, data_root, nproc, create=True):
    cmds = []
    for row in table.rows:
        extra = row.scale_args.get(scale, ()) if scale != "full" else ()
        root = data_root
        if scale == "smoke":
            root = synthetic_root(out, create)
            if row.launcher == "torchrun" or is_imagenet(row.argv):
                root = os.path.join(root, "imagenet")
            extra = tuple(extra) + ("--quiet",)
        for seed in seeds:
            run_dir = os.path.abspath(os.path.join(out, table.id, slug(row.name), f"seed{seed}"))
            cmds.append(command(row.workdir, row.argv, extra, run_dir, seed, root, row.launcher,
                                nproc if scale != "smoke" else 1))
    return cmds


def smoke_commands(out, create=True):
    root = synthetic_root(out, create)
    cmds = []
    for run in all_smoke_runs():
        data = os.path.join(root, "imagenet") if run.dataset == "imagenet" else root
        run_dir = os.path.abspath(os.path.join(out, "smoke", run.workdir, slug(run.name)))
        cmds.append(command(run.workdir, tuple(run.argv) + ("--quiet",), (), run_dir, 1, data, run.launcher,
                            run.nproc))
    return cmds


def shell_line(cmd):
    return f"(cd {shlex.quote(os.path.relpath(cmd['cwd'], REPO))} && {shlex.join(cmd['argv'])})"


def execute(cmds, dry_run):
    failed = []
    for i, cmd in enumerate(cmds, 1):
        if dry_run:
            print(shell_line(cmd))
            continue
        if os.path.exists(os.path.join(cmd["run_dir"], FINISHED_NAME)):
            print(f"[{i}/{len(cmds)}] finished already: {cmd['run_dir']}")
            continue
        print(f"[{i}/{len(cmds)}] {shell_line(cmd)}", flush=True)
        start = time.time()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        code = subprocess.call(cmd["argv"], cwd=cmd["cwd"], env=env)
        print(f"[{i}/{len(cmds)}] exit {code} after {time.time() - start:.0f}s", flush=True)
        if code != 0:
            failed.append(shell_line(cmd))
    return failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", help="'list', 'smoke', or a table id such as table3")
    parser.add_argument("--scale", choices=("smoke", "short", "full"), default="full")
    parser.add_argument("--seeds", default=None, help='seeds, e.g. "1 2 3" (default: the table\'s own)')
    parser.add_argument("--out", default=os.path.join(REPO, "runs"))
    parser.add_argument("--data-root", default=os.path.join(REPO, "data"),
                        help="folder with cifar-*-python/ (CIFAR tables) or train/ and val/ (ImageNet tables)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per torchrun launch (GPUs per node)")
    parser.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)

    if args.what == "list":
        for t in all_tables():
            print(f"{t.id:8s} {t.title}  [{t.source}]  ({len(t.rows)} rows)")
        return 0
    if args.what == "smoke":
        cmds = smoke_commands(out, create=not args.dry_run)
        compare_dirs = [os.path.join(out, "smoke")]
    else:
        try:
            table = find_table(args.what)
        except KeyError as e:
            print(e.args[0], file=sys.stderr)
            return 2
        seeds = [int(s) for s in args.seeds.split()] if args.seeds else list(table.seeds)
        cmds = table_commands(table, args.scale, seeds, out, os.path.abspath(args.data_root), args.nproc,
                              create=not args.dry_run)
        compare_dirs = [os.path.join(out, table.id)]
    failed = execute(cmds, args.dry_run)
    if args.dry_run:
        return 0
    print()
    existing = [d for d in compare_dirs if os.path.isdir(d)]
    if existing:
        compare_main(existing)
    if failed:
        print(f"\n{len(failed)} run(s) failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
