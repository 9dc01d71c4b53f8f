"""dcm/: parity with the released code, architecture fingerprints, float64 end to end, the training script (schedule,
evaluation, smoke runs, bad flags)."""
import copy
import json

import pytest
import torch

from common.fast import Fast
from common.logging import read_log
from common.options import detached_setup
from common.parity import floating_dtypes
from conftest import shared_file
from dcm import main as dcm_main
from dcm import parity
from dcm.convert import export_checkpoint, flat_to_wrn, wrn_to_flat
from dcm.losses import cross_entropy, loss_terms, term_names
from dcm.mobilenet import MobileNet
from dcm.resnet import WRN


pytestmark = pytest.mark.usefixtures("one_thread")


def script_args(*argv):
    """The script's options for ARGV, checked as main() checks them."""
    parser = dcm_main.get_args_parser()
    args = parser.parse_args(list(argv))
    dcm_main.check_args(parser, args)
    return args


def dcm_run(args, nets, test_loader=None):
    """The script's DCMRun over NETS outside a run folder (CPU, faithful path)."""
    return dcm_main.DCMRun(detached_setup(Fast()), args, nets, test_loader)


def fingerprint(name):
    with open(shared_file("dcm", name)) as f:
        return json.load(f)


def test_parity_with_released_code(dcm_fixture):
    report = parity.check_fixture(dcm_fixture)
    print(report.format())
    assert report.ok, report.failed()
    # Everything before the step is well conditioned, and the post-step checksums keep entries that see weight decay.
    assert all(name.startswith("loss after one step") for name in report.not_comparable()), report.format()


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


@pytest.mark.parametrize("net2,method", [("wrn", "dcm"), ("wrn", "dml"), ("none", "baseline"),
                                         ("mobilenet", "dcm"), ("mobilenet", "dml"), ("mobilenet", "baseline")])
def test_float64_step_and_test_pass_never_produce_a_float32_tensor(net2, method):
    args = script_args("--depth", "16", "--width", "0.5", "--net2", net2, "--method", method, "--device", "cpu")
    run = dcm_run(args, [net.double() for net in dcm_main.build_networks(args, 100)])
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randint(0, 100, (2,))
    with floating_dtypes() as seen:
        run.on_epoch_start(0)
        run.train_step(0, x, y)
        run.test_loader = [(x, y)]
        run.evaluate(0)
    assert set(seen) == {torch.float64}, seen


def test_lr_drop_builds_a_new_sgd_so_the_momentum_restarts():
    args = script_args("--depth", "16", "--width", "0.5", "--method", "dml", "--device", "cpu")
    nets = dcm_main.build_networks(args, 100)
    run = dcm_run(args, nets)
    params = run.params
    assert [id(p) for p in params] == [id(p) for net in nets for p in net.parameters()]  # net 1's first
    group = run.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"]) == (
        0.1, 0.9, 0, False, 5e-4)
    lrs = []
    for epoch in range(args.epochs):  # the released schedule: x0.2 at the start of 1-based epochs 60, 120, 160
        run.on_epoch_start(epoch)
        lrs.append(run.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1] * 59 + [0.02] * 60 + [0.004] * 40 + [0.0008] * 41)
    run = dcm_run(args, nets)
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    run.on_epoch_start(0)
    run.iteration(x, y)
    first = run.optimizer
    run.on_epoch_start(58)
    assert first.state and run.optimizer is first
    run.on_epoch_start(59)
    assert run.optimizer is not first and not run.optimizer.state
    before = [p.detach().clone() for p in params]
    run.iteration(x, y)
    lr, wd = run.optimizer.param_groups[0]["lr"], args.weight_decay
    for p, b in zip(params, before):  # a plain SGD step: nothing of the old momentum carried over
        assert torch.equal(p.detach(), b.add(p.grad.add(b, alpha=wd), alpha=-lr))


def test_eval_mode_mobilenet_reads_the_trained_statistics_on_every_test_batch():
    args = script_args("--depth", "16", "--width", "0.5", "--net2", "mobilenet", "--method", "dml",
                       "--device", "cpu")
    nets = dcm_main.build_networks(args, 100)
    torch.manual_seed(0)
    with torch.no_grad():  # trained running statistics, away from their 0/1 start
        for net in nets:
            net.train()(2 * torch.randn(4, 3, 32, 32) + 1)
    batches = [(torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2,))) for _ in range(3)]
    trained = copy.deepcopy(nets[1]).eval()
    record = dcm_run(args, nets, batches).evaluate(0)
    with torch.no_grad():  # eval-mode CE of MobileNet's final head, each batch with the trained statistics
        expected = sum(cross_entropy(trained(x)[0], y).double() * len(y) for x, y in batches).item() / 6
    assert record["test/net2/loss"] == expected
    assert "test/net2_batchstats/top1" in record and "test/net2_batchstats/top5" in record
    state = nets[1].state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())


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
    for key in ("train/ce/n1.aux1", "train/kl/n2.final->n1.aux1", "train/kl/n1.aux2->n2.final", "train/net1/aux2/top1",
                "train/loss_per_batch", "test/loss", "test/net1/top1", "test/net1/aux1/top1", "test/net2/aux2/top5",
                "test/net2/top1", "best/net2/top1", "lr", "epoch_time", "test_time", "images_per_s"):
        assert key in log[0], key
    assert sum(k.startswith("train/kl/") for k in log[0]) == 18 and sum(k.startswith("train/ce/") for k in log[0]) == 6
    lines = (run / "log.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("json_stats: ")
    stats = json.loads(lines[1][len("json_stats: "):])
    assert list(stats)[:3] == ["model", "depth", "width"] and stats["save"] == str(run)
    assert stats["epoch"] == 2 and stats["n_parameters"] == 2 * 202_156 and stats["epoch_step"] == [60, 120, 160]
    assert stats["test_acc"] == log[1]["test/net1/top1"] and stats["test_acc_ep1"] == log[1]["test/net1/aux1/top1"]
    assert stats["train_loss"] == log[1]["train/loss_per_batch"] and stats["test_time"] == log[1]["test_time"]
    assert (run / "checkpoint.pt").exists() and (run / "epoch_end.pt").exists() and (run / "finished").exists()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert len(ckpt["run"]["nets"]) == 2 and ckpt["epochs_done"] == 2 and ckpt["run"]["archs"] == ["wrn", "wrn"]
    released = torch.load(export_checkpoint(run / "checkpoint.pt", tmp_path / "model.pt7"), weights_only=False)
    assert released["epoch"] == 2 and set(released) == {"params", "params_2", "epoch", "optimizer"}
    flat = wrn_to_flat(ckpt["run"]["nets"][1])
    assert list(released["params_2"]) == list(flat) and all(torch.equal(released["params_2"][k], flat[k]) for k in flat)


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
    assert int(ckpt["run"]["nets"][1]["bn1.num_batches_tracked"]) == 1


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


def test_training_loop_trains_with_a_new_optimizer_after_each_drop(tmp_path, synthetic_root, monkeypatch):
    built = []
    real = dcm_main.make_optimizer

    def recording(params, lr, weight_decay):
        built.append(real(params, lr, weight_decay))
        return built[-1]
    monkeypatch.setattr(dcm_main, "make_optimizer", recording)
    run_main(tmp_path, synthetic_root, "drops", "--method", "baseline", "--net2", "none", "--epochs", "3",
             "--steps-per-epoch", "1", "--epoch_step", "[2,3]")
    assert [o.param_groups[0]["lr"] for o in built] == pytest.approx([0.1, 0.02, 0.004])
    assert all(o.state for o in built)  # each one made the steps of its epoch


@pytest.mark.parametrize("argv,message", [
    (["--depth", "10"], "at least 16"),
    (["--depth", "17"], "(depth - 4) % 6 == 0"),
    (["--width", "0"], "width >= 1/16"),
    (["--dtype", "half"], "only --dtype float"),
    (["--epoch_step", "60,120"], "JSON list"),
    (["--epoch_step", "[60, 1.5]"], "JSON list"),
    (["--method", "dcm", "--net2", "none"], "--net2 none is for --method baseline"),
    (["--method", "kd"], "invalid choice"),
    (["--dataset", "SVHN"], "CIFAR10, CIFAR100"),
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--weight_decay=-1e-4"], "--weight_decay must be >= 0"),
    (["--lr_decay_ratio", "0"], "--lr_decay_ratio must be positive"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--nthread", "-1"], "--nthread must be >= 0"),
    (["--print_freq", "0"], "--print_freq must be positive"),
    (["--gpu_id", "first"], "--gpu_id must be GPU numbers"),
    (["--ngpu", "2", "--device", "cpu"], "needs --device cuda"),
])
def test_bad_flags_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        script_args(*argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
