"""FFSD: fingerprints, the training step, the scripts on synthetic data (parity: test_ffsd_parity.py; resume and the
run-folder rules: test_ffsd_runs.py)."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

from common.cli import run_main
from common.logging import read_log
from ffsd.losses import lambda_warmup
from ffsd.models import create_decoder, create_fusion_module, create_model
from ffsd.training import build_networks, build_optimizers, imagenet_lr, train_step, warmed_up_lambdas

pytestmark = pytest.mark.usefixtures("one_thread")


LAMBDAS = {"diversity": 1e-5, "fusion": 10.0, "self_distillation": 1000.0}


def layout(module):
    return [[k, list(v.shape)] for k, v in module.state_dict().items()]


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_layouts_and_parameter_counts_match_fingerprints(ffsd_fingerprint):
    fp = json.loads(ffsd_fingerprint.read_text())
    model = fp["model"]
    dataset = "imagenet" if "forward_2x3x224x224_train_mode" in fp else "cifar100"
    student = create_model(model, dataset)
    leader = create_model(model, dataset, leader=True)
    fusion = create_fusion_module(student, dataset)
    decoder = create_decoder(model, student, 4 if dataset == "imagenet" else 3)
    saved = list(fp["saved_checkpoints"].values())
    assert layout(student) == saved[0] == saved[1]
    assert layout(fusion) == saved[2]
    assert layout(leader) == saved[3]
    assert layout(decoder) == list(fp["trained_but_never_saved"].values())[0]
    counts = fp["param_counts"]
    assert count(student) == counts["student_each"]
    assert count(leader) == counts["leader_total_incl_trans_fusion_module"]
    assert count(fusion) == counts["fusion_module"]
    assert count(decoder) == counts["sd_model_each"]
    assert 2 * count(student) + count(leader) + count(fusion) + 2 * count(decoder) == counts["whole_training_ensemble"]


def test_published_counts_from_the_spec():
    # the spec's table, independent of the JSON files: ResNet-32 leader and whole training ensemble
    student = create_model("resnet32")
    nets = build_networks("resnet32")
    assert count(student) == 472_756
    assert count(nets) == 1_489_920


def test_warmup_factors():
    factors = [lambda_warmup(1.0, e) for e in range(1, 7)]
    assert factors == pytest.approx([0.0407622, 0.1652989, 0.4493290, 0.8187308, 1.0, 1.0], rel=1e-6)


def test_imagenet_lr_rule_and_its_warmup_switch():
    n = 10  # iterations per epoch
    # released: the warm-up written for epochs from 0 runs on epochs from 1: epochs 1-4, from (1 + n) / 5n
    assert imagenet_lr(0.1, 1, 0, n) == pytest.approx(0.1 * 11 / 50)
    assert imagenet_lr(0.1, 4, 9, n) == pytest.approx(0.1) and imagenet_lr(0.1, 5, 0, n) == 0.1
    # five_epochs: epochs 1-5, from 1 / 5n
    assert imagenet_lr(0.1, 1, 0, n, "five_epochs") == pytest.approx(0.1 / 50)
    assert imagenet_lr(0.1, 5, 0, n, "five_epochs") == pytest.approx(0.1 * 41 / 50)
    assert imagenet_lr(0.1, 6, 0, n, "five_epochs") == 0.1
    assert [imagenet_lr(0.1, e, 0, n) for e in (29, 30, 60, 79, 80)] == pytest.approx([0.1, 1e-2, 1e-3, 1e-3, 1e-4])


def test_detach_points_and_loss_falls():
    """Repeating one batch: every network's loss falls; a student's loss reaches only its own parameters."""
    torch.manual_seed(0)
    nets = build_networks("resnet20")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    optimizers = build_optimizers(nets, lr=0.05)
    nets.train()
    first = None
    for _ in range(3):
        terms, _ = train_step(nets, optimizers, x, y, warmed_up_lambdas(LAMBDAS, 6))
        first = first or terms
    for name in ("student0/total", "student1/total", "fusion/total", "leader/total"):
        assert terms[name] < first[name], name
    # leader and fusion losses never reach the students: their grads stay None after a step that zeroes them
    for student in nets.students:
        for p in student.parameters():
            p.grad = None
    for opt in ("fusion_module", "leader"):
        optimizers[opt].zero_grad()
    nets.train()
    logits, maps, trans = nets.leader(x)
    student_maps = [s(x)[1] for s in nets.students]
    fusion_logits, fused = nets.fusion_module(torch.cat([m[-1].detach() for m in student_maps], 1))
    (logits.sum() + trans.sum() + fusion_logits.sum() + fused.sum()).backward()
    assert all(p.grad is None for s in nets.students for p in s.parameters())


def test_bad_options_fail_clearly(tmp_path, synthetic_root, capsys):
    from ffsd.train import main

    def run(*args):
        with pytest.raises(SystemExit) as e:
            main(["--data-root", str(synthetic_root), "--run-dir", str(tmp_path / "bad"), *args])
        assert e.value.code != 0
        return capsys.readouterr().err
    err = run("--model", "resnet21")
    assert "valid: resnet20, resnet32" in err and "googlenet" in err
    assert "--model_num must be at least 2" in run("--model", "resnet20", "--model_num", "1")
    assert "invalid choice" in run("--model", "resnet20", "--lr_policy", "linear")
    assert "imagenet.py only" in run("--model", "resnet20", "--imagenet_warmup", "five_epochs")
    assert not (tmp_path / "bad").exists()  # nothing written before the options are valid


SMOKE = ["--model", "resnet20", "--n_epochs", "3", "--steps-per-epoch", "2", "--eval-batches", "1",
         "--train_batch_size", "4", "--test_batch_size", "8", "--workers", "0", "--quiet", "--seed", "1"]


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory, synthetic_root):
    from ffsd.train import main
    run_dir = tmp_path_factory.mktemp("ffsd_cifar") / "run"
    main(SMOKE + ["--data-root", str(synthetic_root), "--run-dir", str(run_dir)])
    return run_dir


def test_cifar_smoke_run_writes_everything(cifar_run):
    records = read_log(cifar_run)
    assert [r["epoch"] for r in records] == [1, 2]  # --n_epochs 3 is exclusive, as released
    for key in ("train/loss", "train/student1/diversity", "train/leader/trans_fusion", "train/sd_leader/attention",
                "test/leader/top1", "test/fusion/top1", "test/student0/top5", "test/ensemble_oracle/top1",
                "test/ensemble/top1", "test/average/top1", "lambda/fusion", "best/leader/top1", "lr"):
        assert key in records[-1], key
    assert records[0]["lambda/fusion"] == pytest.approx(10 * 0.0407622, rel=1e-6)
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in records)
    for name in ("model0_best.pth", "model1_best.pth", "modelfusion_best.pth", "modelleader_best.pth"):
        assert (cifar_run / "checkpoints" / name).exists()
    for name in ("checkpoint.pt", "epoch_end.pt", "logger.log", "config.txt", "args.json", "finished"):
        assert (cifar_run / name).exists()
    log_text = (cifar_run / "logger.log").read_text()
    assert "Model[Fusion]/[Leader] Epoch" in log_text and " | Epoch[1]\tTime" in log_text
    leader = torch.load(cifar_run / "checkpoints" / "modelleader_best.pth", weights_only=False)
    assert set(leader) == {"weight", "epoch", "cfg", "index"} and leader["index"] == "leader"
    assert layout_of(leader["weight"]) == layout(create_model("resnet20", leader=True))


def layout_of(state):
    return [[k, list(v.shape)] for k, v in state.items()]


def test_test_py_reads_authors_and_prefixed_checkpoints(cifar_run, synthetic_root, tmp_path, capsys):
    from ffsd.test import main as test_main
    authors = cifar_run / "checkpoints" / "modelleader_best.pth"
    prefixed = tmp_path / "prefixed.pth"
    weights = torch.load(authors, weights_only=False)["weight"]
    torch.save({"module." + k: v for k, v in weights.items()}, prefixed)
    common = ["--data-root", str(synthetic_root), "--workers", "0", "--eval-batches", "1", "--test_batch_size", "8"]
    accuracies = [test_main(common + ["--model", "resnet20", "--load_path", str(path)])
                  for path in (authors, prefixed, cifar_run / "checkpoint.pt")]
    assert accuracies[0] == accuracies[1] == accuracies[2]
    assert capsys.readouterr().out.count("Model[Leader]:\tAccuracy ") == 3
    for model, path, message in (("resnet32", prefixed, "weights do not fit the resnet32 leader"),
                                 ("resnet20", tmp_path / "missing.pth", "does not exist")):
        with pytest.raises(SystemExit) as e:
            run_main(test_main, common + ["--model", model, "--load_path", str(path)])
        assert e.value.code == 1 and message in capsys.readouterr().err


def tiny_run(model, synthetic_root, tmp_path, steps):
    from ffsd.train import main
    main(["--model", model, "--n_epochs", "2", "--steps-per-epoch", str(steps), "--eval-batches", "1",
          "--train_batch_size", "2", "--test_batch_size", "2", "--workers", "0", "--quiet",
          "--data-root", str(synthetic_root), "--run-dir", str(tmp_path / model)])
    assert (tmp_path / model / "checkpoints" / "modelleader_best.pth").exists()
    assert len(read_log(tmp_path / model)) == 1


def test_cifar_smoke_densenet(synthetic_root, tmp_path):
    # a non-ResNet in the default suite: concatenating dense blocks and the fixed-width (DIY) decoders
    tiny_run("densenet", synthetic_root, tmp_path, steps=1)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet32", "resnet56", "wideresnet1602", "wideresnet4002", "googlenet"])
def test_cifar_smoke_every_architecture(model, synthetic_root, tmp_path):
    tiny_run(model, synthetic_root, tmp_path, steps=2)


def test_imagenet_under_torchrun_two_processes(synthetic_root, tmp_path):
    run_dir = tmp_path / "imagenet"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ffsd.imagenet",
           "--model", "resnet18", "--n_epochs", "2", "--steps-per-epoch", "1", "--eval-batches", "1",
           "--train_batch_size", "4", "--test_batch_size", "4", "--workers", "0", "--quiet",
           "--data-root", str(synthetic_root / "imagenet"), "--run-dir", str(run_dir)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    record = read_log(run_dir)[-1]
    assert record["epoch"] == 1 and "test/leader/top1" in record and "test/student0/top5" in record
    args = json.loads((run_dir / "args.json").read_text())
    assert args["train_batch_size"] == 4 and args["script"] == "ffsd/imagenet.py"
    # the warm-up spans len(train) // --train_batch_size iterations per epoch (released: // 256, its forced batch)
    n_train = sum(1 for p in (synthetic_root / "imagenet" / "train").rglob("*") if p.is_file())
    assert record["lr"] == pytest.approx(imagenet_lr(0.1, 1, 0, n_train // 4), rel=1e-12)
    assert record["lr"] != pytest.approx(imagenet_lr(0.1, 1, 0, max(n_train // 256, 1)), rel=1e-3)
    assert (run_dir / "checkpoints" / "modelleader_best.pth").exists()
