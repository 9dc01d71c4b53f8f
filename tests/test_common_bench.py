"""common.bench: the FLOP counter, every case's end-to-end loader (the training script's own), one real run of the
command line with its JSON and markdown, and --compare. Values only: nothing here is timed."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from common.bench import all_cases, allocated_mb, compare_files, forward_flops, markdown_table, operator_calls, phases
from common.fast import DeviceCifarLoader, Fast
from common.options import loader_workers

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
# the loader workers of each script by default: the released ones (the spec's DataLoader rows; mcl's flag default,
# which the authors' CIFAR scripts ignored), never more than this machine's cores
RELEASED_WORKERS = {"dcm": 4, "okddip": 8, "ffsd": 8, "mcl": 8}


def test_forward_flops_of_cifar_resnet32_is_its_known_count():
    from okddip.models import plain_network
    # ResNet-32 (CIFAR, 100 classes): 69.1 M multiply-adds per image, i.e. 138.3 MFLOP
    flops = forward_flops(plain_network("resnet32", 100), torch.randn(2, 3, 32, 32))
    assert flops == pytest.approx(2 * 69.13e6, rel=1e-2)


def _bench_args(**over):
    args = dict(batch=4, workers=None, data_on_device=False, channels_last=False, amp="none", compile=False,
                fast=False, device="cpu")
    args.update(over)
    return SimpleNamespace(**args)


def _loader(case, root, **over):
    args = _bench_args(**over)
    return case.train_loader(root, fast=Fast.from_args(args, "cpu"), batch=args.batch, workers=args.workers)


def _loader_kinds():
    """One case per (paper, method, dataset): the loader depends on nothing else."""
    seen = {}
    for case in all_cases():
        seen.setdefault((case.paper, case.method, case.dataset), case)
    return list(seen.values())


@pytest.mark.parametrize("case", _loader_kinds(), ids=lambda c: f"{c.paper}-{c.method}-{c.dataset}")
def test_every_case_feeds_its_step_from_the_scripts_own_loader(case, synthetic_root):
    assert case.train_loader is not None
    root = str(synthetic_root / "imagenet") if case.dataset == "imagenet" else str(synthetic_root)
    assert _loader(case, root).num_workers == loader_workers(RELEASED_WORKERS[case.paper])
    x, y = next(iter(_loader(case, root, workers=0)))
    size = 224 if case.dataset == "imagenet" else 32
    assert x.shape == (4, 3, size, size) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -3 < x.mean().item() < 3 and x.std().item() > 0.1  # normalised images, not raw bytes
    if case.dataset != "imagenet":
        args = _bench_args(data_on_device=True, channels_last=True)
        fast = Fast.from_args(args, "cpu")
        loader = case.train_loader(root, fast=fast, batch=args.batch, workers=args.workers)
        assert isinstance(loader, DeviceCifarLoader)
        x, _ = fast.inputs(*next(iter(loader)))
        assert x.shape == (4, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)


def test_bench_command_line_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "common.bench", "--paper", "ffsd", "--arch", "resnet20", "--batch",
                          "4", "--steps", "1", "--warmup", "1", "--workers", "0", "--device", "cpu", "--json",
                          str(out), "--markdown"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(out.read_text())
    assert (row["paper"], row["method"], row["arch"], row["batch"]) == ("ffsd", "FFSD", "resnet20", 4)
    for key in ("train_images_per_s", "e2e_images_per_s", "eval_images_per_s", "peak_memory_mb",
                "allocated_mb_per_step"):
        assert row[key] > 0, key
    assert row["minor_faults_per_step"] >= 0
    # the leader: ResNet-20 (40.8 M multiply-adds) plus its TransFusion head
    assert 0.0816 < row["deployed_gflops_per_image"] < 0.09
    assert row["options"] == {"data_on_device": False, "amp": "none", "channels_last": False, "compile": False}
    assert "| ffsd | FFSD | resnet20 | 4 |" in run.stdout and "fast options: none (faithful)" in run.stdout


def test_allocations_count_new_storage_only():
    x = torch.zeros(1024, 256)  # 1 MiB of float32
    assert allocated_mb(lambda: x + 1) == pytest.approx(1.0)
    assert allocated_mb(lambda: x.add_(1)) == 0.0
    assert allocated_mb(lambda: x.view(256, 1024)) == 0.0
    assert allocated_mb(lambda: torch.relu(x).relu_()) == pytest.approx(1.0)


def _row(method, train, e2e):
    return {"paper": "p", "method": method, "arch": "a", "batch": 8, "train_images_per_s": train,
            "e2e_images_per_s": e2e, "eval_images_per_s": 10.0, "peak_memory_mb": 100.0,
            "deployed_gflops_per_image": 0.1, "train_tflops_per_s": 0.01, "device_name": "cpu", "torch": "2",
            "date": "2026-01-01", "options": {"amp": "none"}}


def test_compare_prints_the_ratio_of_every_common_row(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([_row("x", 10.0, 5.0), _row("only-in-a", 1.0, None)]))
    b.write_text(json.dumps([_row("x", 30.0, 20.0)]))
    compare_files(a, b)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].split()[3:6] == ["3.00", "4.00", "1.00"]


def test_markdown_escapes_pairs_and_marks_missing_end_to_end():
    row = _row("m", 1.0, None)
    row["arch"] = "wrn|mobilenet"
    table = markdown_table([row])
    assert "| p | m | wrn\\|mobilenet | 8 | 1.0 | - |" in table


def test_meta_phases_recompute_no_pass_and_account_for_every_operator():
    """The L-MCL meta iteration's named phases (common.bench.phases), in the released order: each virtual step and
    the meta objective is one pass of the pair (an ordinary step's convolutions, their backwards and batch norms); the
    second-order phases run no network forward (no batch norm: the authors' sweep re-evaluates L_s there); outside
    the phases runs exactly one ordinary step."""
    case = next(c for c in all_cases() if (c.paper, c.method, c.arch) == ("mcl", "L-MCL", "resnet32"))
    built = case.build(fast=Fast(torch.device("cpu")), batch=8)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    meta = built.extra_steps["meta"]
    ordinary = operator_calls(lambda: built.step(x, y))
    found = phases(lambda: meta(x, y), ratio=1.0)
    assert list(found) == [f"L_{s} and its gradient at theta_{s} (graph kept)" for s in range(3)] + [
        "meta objective and its gradient at theta_3", "H_2 v (second order, at theta_2)",
        "H_1 v and d<g_1, v>/dphi (second order, at theta_1)", "d<g_0, v>/dphi (second order, at theta_0)"]
    passes = [calls for _, *calls in found.values()]
    assert all(calls == ordinary for calls in passes[:4])
    assert all(batch_norms == 0 for *_, batch_norms in passes[4:])
    whole = operator_calls(lambda: meta(x, y))
    assert [n - sum(calls[i] for calls in passes) for i, n in enumerate(whole)] == ordinary
    assert 0 < sum(share for share, *_ in found.values()) <= 1  # shares of the one call's time
