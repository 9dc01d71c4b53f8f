"""dcm/: parity with the released code, architecture fingerprints, the training script (smoke, resume, bad flags)."""
import json

import pytest
import torch

from common.checkpoint import CheckpointError
from common.logging import read_log
from conftest import SHARED_FIXTURES, paper_fixtures
from dcm import main as dcm_main
from dcm import parity
from dcm.convert import flat_to_wrn, wrn_to_flat
from dcm.losses import loss_terms, term_names
from dcm.mobilenet import MobileNet
from dcm.resnet import WRN

FOLDER, FIXTURES = paper_fixtures("dcm")


def fingerprint(name):
    path = SHARED_FIXTURES / "dcm" / name
    if not path.exists():
        pytest.skip(f"shared fixtures folder {path.parent} is absent")
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("path", FIXTURES or [None], ids=lambda p: p.name if p else "none")
def test_parity_with_released_code(path):
    if path is None:
        pytest.skip(f"no DCM fixtures: {FOLDER} is absent or empty")
    report = parity.check_fixture(path)
    report.print()
    assert report.ok, [r for r in report.rows if not r[3]]


@pytest.mark.parametrize("name,depth,width", [("wrn-28-10.json", 28, 10.0), ("wrn-16-0.5.json", 16, 0.5)])
def test_wrn_layout_and_counts_match_fingerprint(name, depth, width):
    fp = fingerprint(name)
    with torch.device("meta"):  # WRN-28-10 with aux heads is 164 M parameters: shapes only
        net = WRN(depth, width, fp["config"]["num_classes"])
        deployed = WRN(depth, width, fp["config"]["num_classes"], aux=False)
    flat = wrn_to_flat(net.state_dict())
    assert [[k, list(v.shape)] for k, v in flat.items()] == fp["state_dict"]
    trainable = set(wrn_to_flat(dict(net.named_parameters())))
    assert [k for k in flat if k not in trainable] == fp["non_trainable_keys"]
    counts = fp["param_counts"]
    assert sum(p.numel() for p in net.parameters()) == counts["with_aux"]
    assert sum(p.numel() for p in net.deployed_parameters()) == counts["final_model_without_aux"]
    assert sum(p.numel() for p in deployed.parameters()) == counts["final_model_without_aux"]


def test_wrn_28_10_published_counts():
    with torch.device("meta"):
        net = WRN(28, 10, 100)
    assert sum(p.numel() for p in net.parameters()) == 164_146_364
    assert sum(p.numel() for p in net.deployed_parameters()) == 36_536_884


def test_mobilenet_layout_and_counts_match_fingerprint():
    fp = fingerprint("mobilenet.json")
    with torch.device("meta"):
        net = MobileNet(100)
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == fp["state_dict"]
    assert sum(p.numel() for p in net.parameters()) == fp["param_counts"]["with_aux"] == 11_431_276
    assert sum(p.numel() for p in net.deployed_parameters()) == fp["param_counts"]["final_model_without_aux"]


def test_forward_shapes_and_flat_dict_round_trip():
    torch.manual_seed(0)
    net = WRN(16, 0.5, 100).reset_parameters_as_released()
    outputs = net.train()(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(2, 100)] * 3
    state = net.state_dict()
    back = flat_to_wrn(wrn_to_flat(state), num_batches_tracked=1)  # the released dict has no such counter
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    # BN gamma ~ U[0, 1) (released init), not PyTorch's 1
    assert 0 <= net.bn.weight.min() and net.bn.weight.max() < 1 and net.bn.weight.std() > 0.1


def test_loss_terms_per_method():
    torch.manual_seed(0)
    y = torch.randint(0, 10, (4,))
    three = [tuple(torch.randn(4, 10) for _ in range(3)) for _ in range(2)]
    one = [(torch.randn(4, 10),) for _ in range(2)]
    assert len(loss_terms(three, y)) == 24 and len(term_names(three)) == 24
    assert term_names(one) == ["CE(n1.final)", "CE(n2.final)", "KL(p[n2.final].detach() || p[n1.final])",
                               "KL(p[n1.final].detach() || p[n2.final])"]
    assert len(loss_terms(one, y, distill=False)) == 2
    # identical networks: the same-stage KL terms vanish, the cross-stage ones (aux1 <-> final, ...) do not
    kl = loss_terms([three[0], three[0]], y)[6:]
    same_stage = {0, 4, 8, 9, 13, 17}
    assert all(abs(kl[i].item()) < 1e-6 for i in same_stage)
    assert all(kl[i].item() > 1e-3 for i in range(18) if i not in same_stage)
    # the teacher side is detached: net 2's logits get gradient only from its own CE and the KL where it is student
    z1 = torch.randn(4, 10, requires_grad=True)
    z2 = torch.randn(4, 10, requires_grad=True)
    kl_1_student = loss_terms([(z1,), (z2,)], y)[2]
    kl_1_student.backward()
    assert z2.grad is None and z1.grad is not None


def run_main(tmp_path, synthetic_root, name, *extra):
    run_dir = tmp_path / name
    argv = ["--depth", "16", "--width", "0.5", "--batch_size", "8", "--nthread", "0", "--eval-batches", "1",
            "--data-root", str(synthetic_root), "--run-dir", str(run_dir), "--seed", "1", "--quiet", "--device", "cpu",
            *extra]
    dcm_main.main(argv)
    return run_dir


def test_smoke_dcm_wrn_pair_loss_falls_and_logs(tmp_path, synthetic_root):
    run = run_main(tmp_path, synthetic_root, "dcm", "--epochs", "2", "--steps-per-epoch", "3")
    log = read_log(run)
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[1]["train/loss"] < log[0]["train/loss"]
    for key in ("train/ce/n1.aux1", "train/kl/n2.final->n1.aux1", "train/kl/n1.aux2->n2.final", "test/loss",
                "test/net1/top1", "test/net1/aux1/top1", "test/net2/aux2/top5", "test/net2/top1", "best/net2/top1",
                "lr", "epoch_time", "images_per_s"):
        assert key in log[0], key
    assert sum(k.startswith("train/kl/") for k in log[0]) == 18 and sum(k.startswith("train/ce/") for k in log[0]) == 6
    lines = (run / "log.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("json_stats: ")
    stats = json.loads(lines[1][len("json_stats: "):])
    assert list(stats)[:3] == ["model", "depth", "width"]
    assert stats["epoch"] == 2 and stats["n_parameters"] == 2 * 202_156
    assert stats["test_acc"] == log[1]["test/net1/top1"] and stats["test_acc_ep1"] == log[1]["test/net1/aux1/top1"]
    assert (run / "checkpoint.pt").exists() and (run / "finished").exists()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert len(ckpt["nets"]) == 2 and ckpt["epoch"] == 2


def test_smoke_mobilenet_partner_logs_both_bn_modes(tmp_path, synthetic_root):
    run = run_main(tmp_path, synthetic_root, "mobi", "--net2", "mobilenet", "--epochs", "1", "--steps-per-epoch", "1",
                   "--batch_size", "4")
    rec = read_log(run)[0]
    for key in ("test/net2/top1", "test/net2_batchstats/top1", "test/net2_batchstats/aux1/top1", "test/net1/aux2/top1"):
        assert key in rec, key
    stats = json.loads((run / "log.txt").read_text().splitlines()[0][len("json_stats: "):])
    assert stats["test_acc_another"] == rec["test/net2_batchstats/top1"]
    assert stats["n_parameters"] == 202_156 + 11_431_276
    # the batch-statistics test pass must not leave test data in MobileNet's running statistics
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert int(ckpt["nets"][1]["bn1.num_batches_tracked"]) == 1


def test_dml_and_baseline_schedule_and_terms(tmp_path, synthetic_root):
    run = run_main(tmp_path, synthetic_root, "dml", "--method", "dml", "--epochs", "2", "--steps-per-epoch", "2",
                   "--epoch_step", "[2]")
    log = read_log(run)
    assert [r["lr"] for r in log] == [0.1, pytest.approx(0.02)]  # drop at the start of 1-based epoch 2
    assert sorted(k for k in log[0] if k.startswith("train/kl/")) == ["train/kl/n1.final->n2.final",
                                                                       "train/kl/n2.final->n1.final"]
    assert "test/net1/aux1/top1" not in log[0]
    run = run_main(tmp_path, synthetic_root, "base", "--method", "baseline", "--net2", "none", "--epochs", "1",
                   "--steps-per-epoch", "2")
    rec = read_log(run)[0]
    assert "test/net2/top1" not in rec and not any(k.startswith("train/kl/") for k in rec)
    assert json.loads((run / "log.txt").read_text()[len("json_stats: "):])["n_parameters"] == 48_180


class Killed(Exception):
    pass


@pytest.mark.parametrize("loader", [(), ("--data-on-device",)], ids=["pil", "data-on-device"])
def test_resume_mid_epoch_is_bit_exact(tmp_path, synthetic_root, monkeypatch, loader):
    common = ("--method", "dml", "--steps-per-epoch", "2", "--epoch_step", "[2]", "--epochs", "2",
              "--save-every-steps", "1", *loader)
    full = run_main(tmp_path, synthetic_root, "full", *common)
    saves = []
    real_save = dcm_main.save_checkpoint

    def save_then_die(*args, **kwargs):  # dies right after the checkpoint of epoch 2, step 1
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 4:
            raise Killed
    monkeypatch.setattr(dcm_main, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run_main(tmp_path, synthetic_root, "part", *common)
    monkeypatch.setattr(dcm_main, "save_checkpoint", real_save)
    part = run_main(tmp_path, synthetic_root, "part", *common, "--resume")
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(part / "checkpoint.pt", weights_only=False)
    for sa, sb in zip(a["nets"], b["nets"]):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    la, lb = read_log(full), read_log(part)
    assert [r["train/loss"] for r in la] == [r["train/loss"] for r in lb]
    assert [r["lr"] for r in lb] == [0.1, pytest.approx(0.02)]
    assert len((part / "log.txt").read_text().splitlines()) == 2


def test_resume_refuses_other_configuration(tmp_path, synthetic_root):
    run_main(tmp_path, synthetic_root, "cfg", "--method", "baseline", "--net2", "none", "--epochs", "1",
             "--steps-per-epoch", "1")
    with pytest.raises(CheckpointError, match="different run configuration"):
        run_main(tmp_path, synthetic_root, "cfg", "--method", "dml", "--epochs", "2", "--steps-per-epoch", "1",
                 "--resume")


@pytest.mark.parametrize("argv,message", [
    (["--depth", "10"], "at least 16"),
    (["--depth", "17"], "(depth - 4) % 6 == 0"),
    (["--dtype", "half"], "only --dtype float"),
    (["--epoch_step", "60,120"], "JSON list"),
    (["--method", "dcm", "--net2", "none"], "--net2 none is for --method baseline"),
    (["--method", "kd"], "invalid choice"),
    (["--dataset", "SVHN"], "CIFAR10, CIFAR100"),
])
def test_bad_flags_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit):
        dcm_main.parse_args(argv)
    assert message in capsys.readouterr().err
