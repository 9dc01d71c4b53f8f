"""OKDDip: parity with the released code's fixtures, the released layout of every fingerprinted model and its
construction order, the bugs fixed against the released code (network-based query/key init, DenseNet ensemble,
train_one --MulStu), losses, schedule, smoke runs of the variants tests/test_okddip_runs.py does not train, KD from
a train.py teacher, bad flags."""
import json
import math
import os
import re

import pytest
import torch

from common.logging import read_log
from common.parity import Report
from conftest import shared_file
from okddip import parity, students
from okddip.engine import lr_at
from okddip.losses import kl_t, okddip_loss, ramp_weight
from okddip.models import IndependentNets, OKDDipBranches, ONEBranches, plain_network

TINY = ["--num_epochs", "1", "--steps-per-epoch", "2", "--eval-batches", "1", "--batch_size", "8",
        "--num_workers", "0", "--lr", "0.02", "--seed", "1", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_parity_with_released_code(okddip_fixture):
    report = parity.check_fixture(okddip_fixture)
    print(report.format())
    assert report.ok, report.failed()
    names = [item.name for item in report.items]
    for section in ("layout", "canonical.loss", "seed-0 weights regenerated", "train_step", "state after the step"):
        assert any(section in n for n in names), section
    # every decision of the float32 rule compared something: no item is wholly "not comparable"
    assert not report.not_comparable(), report.not_comparable()
    # the post-step items can see weight decay: one step moves every weight by lr (1 + momentum) wd = 9.5e-5
    for item in report.items:
        if item.name.endswith("state after the step (sum, l2)"):
            assert item.tolerance < 0.1 * 1.9 * 5e-4, item.line(40)


def test_one_gate_bias_gradient_is_compared_against_its_layer():
    """control_v1.bias feeds a BatchNorm1d: its true gradient is 0, the stored values (1e-6) are float32 noise.
    Against its own size that noise is not comparable at all; against its layer's gradient (control_v1.weight's
    rms) it is compared, and matches."""
    path = shared_file("okddip", "resnet32_one_fixture.pt")
    fx = parity.load_fixture(path)
    setup = parity.Setup(fx, path.parent, path.name)
    stored = fx["original_train_step"][0]["grads_of_total_loss"]
    assert stored["control_v1.bias"]["l2"] < 1e-5 < stored["control_v1.weight"]["l2"]
    _, grads, _ = parity.train_step(setup, setup.args, 0)
    g32, g64 = grads[torch.float32], grads[torch.float64]
    bias = {"control_v1.bias": stored["control_v1.bias"]["full"]}
    assert float(g64["control_v1.bias"].abs().max()) < 1e-12 < float(g32["control_v1.bias"].abs().max())
    own, layer = Report("own scale"), Report("layer scale")
    parity.layer_tensors(own, "bias", g32, bias, g64, {})
    parity.layer_tensors(layer, "bias", g32, bias, g64, parity.layer_floors(g64))
    assert own.not_comparable() == ["bias"]
    assert layer.ok and not layer.not_comparable(), layer.format()


def test_layout_matches_the_authors_fingerprint(okddip_fingerprint):
    """Key names, shapes and order of the released state_dict (every architecture and method fingerprinted), the
    parameter counts and the forward's output shapes, for the model the training script builds."""
    ref = json.loads(okddip_fingerprint.read_text())
    script, argv, classes = parity.configuration(ref["constructor"])
    model = script.build(parity.script_args(script, argv), classes).model
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    assert len(list(model.parameters())) == ref["num_parameter_tensors"]
    if "deployed_model_prefixes" in ref:
        deployed = sum(p.numel() for n, p in model.named_parameters()
                       if any(n.startswith(pre) for pre in ref["deployed_model_prefixes"]))
        assert deployed == ref["deployed_model_parameters"]
    x = torch.randn(*ref["forward"]["input_shape"])
    for mode, key in ((model.train, "train_mode_outputs"), (model.eval, "eval_mode_outputs")):
        mode()
        with torch.no_grad():
            out = model(x)
        released = [out] if torch.is_tensor(out) else [out[k] for k in ("pro", "x_m", "leader") if k in out]
        shapes = [list(o.shape) if o is not None else None for o in released]
        assert shapes == [o.get("shape") for o in ref["forward"][key]], key


RNG_DRAWS = ("kaiming_uniform_", "uniform_", "kaiming_normal_", "normal_")


def recorded_draws(build):
    """[(init function, parameter name)] of every RNG-drawing init call while BUILD() constructs a model."""
    calls, originals = [], {name: getattr(torch.nn.init, name) for name in RNG_DRAWS}

    def recording(name):
        def draw(tensor, *args, **kwargs):
            calls.append((name, tensor))
            return originals[name](tensor, *args, **kwargs)
        return draw

    for name in RNG_DRAWS:
        setattr(torch.nn.init, name, recording(name))
    try:
        model = build()
    finally:
        for name, fn in originals.items():
            setattr(torch.nn.init, name, fn)
    names = {id(p): n for n, p in model.named_parameters()}
    return [(fn, names[id(t)]) for fn, t in calls if id(t) in names]


def released_draws(ref):
    """The released construction's RNG draws, from its fingerprint and the spec's rules: every Conv2d/Linear draws
    its default init when created (a ResNet stage's downsample before its first block, a shared DenseNet block
    once), then the init loop redraws in registration order (conv kaiming_normal_; VGG: Linear normal_ too);
    densenet_GL creates its query/key after the loop."""
    shapes = dict((k, s) for k, s in ref["state_dict"])
    modules = list(dict.fromkeys(k.rpartition(".")[0] for k in shapes))
    layers = [m for m in modules if f"{m}.running_mean" not in shapes and f"{m}.weight" in shapes]
    if "densenet_" in ref["constructor"]:  # one block object under every branch name: drawn once
        layers = [m for m in layers if not re.match(r"^(Branch|layer3_)[1-9]\d*\.", m)]
    late = [m for m in layers if "densenet_GL" in ref["constructor"] and m in ("query_weight", "key_weight")]
    created = [m for m in layers if m not in late]
    for m in [m for m in created if m.endswith(".0.downsample.0")]:
        created.remove(m)
        created.insert(created.index(m.replace("downsample.0", "conv1")), m)

    def default(ms):
        return [d for m in ms for d in [("kaiming_uniform_", f"{m}.weight")] +
                ([("uniform_", f"{m}.bias")] if f"{m}.bias" in shapes else [])]

    looped = [m for m in layers if m not in late]  # registration order
    conv = lambda m: len(shapes[f"{m}.weight"]) == 4
    if ".vgg" in ref["constructor"]:
        redrawn = [("kaiming_normal_" if conv(m) else "normal_", f"{m}.weight") for m in looped]
    else:
        redrawn = [("kaiming_normal_", f"{m}.weight") for m in looped if conv(m)]
    return default(created) + redrawn + default(late)


@pytest.mark.parametrize("tag", ["vgg16_c100", "vgg16_one_c100", "densenetd40k12_c100", "densenetd40k12_one_c100",
                                 "densenetd40k12_GL_c100", "resnet32_GL", "resnet32_one"])
def test_construction_draws_the_rng_in_the_released_order(tag):
    ref = json.loads(shared_file("okddip", f"{tag}.json").read_text())
    script, argv, classes = parity.configuration(ref["constructor"])
    args = parity.script_args(script, argv)
    assert recorded_draws(lambda: script.build(args, classes).model) == released_draws(ref)


def test_network_based_okddip_keeps_the_default_query_key_init():
    """The released StuNet creates query/key after its networks and never re-initialises them: kaiming-uniform
    U(+-1/sqrt(512)) for VGG-16 (std 0.0255), not the N(0, 0.01) of VGG's own Linear layers."""
    torch.manual_seed(0)
    model = IndependentNets("vgg16", 100, 3, attention=True)
    std = model.query_weight.weight.std().item()
    assert abs(std - 1 / math.sqrt(3 * 512)) < 1e-3 and abs(model.key_weight.weight.std().item() - std) < 1e-3
    assert abs(model.stu0.classifier[0].weight.std().item() - 0.01) < 1e-3  # the network's own init is N(0, 0.01)


def test_densenet_okddip_ensemble_is_the_mean_of_every_column():
    """The released train_GL logs the mean of all columns of `pro` as the ensemble; the shared-block DenseNet
    returns all m branches (the leader's branch included, with its final BN), so that is what it averaged."""
    torch.manual_seed(0)
    model = OKDDipBranches("densenetd40k12", 10, 4)
    out = model(torch.randn(4, 3, 32, 32))
    logits, individuals = students.student_logits("okddip", out)
    assert out["pro"].shape[-1] == 4 and individuals == ["peer0", "peer1", "peer2"]
    assert torch.equal(logits["ensemble"], out["pro"].mean(-1))
    assert torch.equal(logits["ensemble_peers"], out["pro"][:, :, :3].mean(-1))
    assert not torch.allclose(logits["ensemble"], logits["ensemble_peers"])
    plain = OKDDipBranches("resnet32", 10, 4)(torch.randn(4, 3, 32, 32))
    assert "ensemble_peers" not in students.student_logits("okddip", plain)[0]


def test_train_one_refuses_mulstu_with_a_clear_message(tmp_path, capsys):
    from okddip import train_one
    with pytest.raises(SystemExit):
        train_one.main(["--MulStu", "--run-dir", str(tmp_path / "r")])
    assert "train_GL.py --MulStu" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("arch,c,gl,one,clilr,dml,mulstu", [
    ("resnet110", 10, 3781496, 3765636, 3765112, 4590952, 4607336),
    ("wide_resnet20_8", 100, 22611936, 22596076, 22595552, None, None),
    ("vgg16", 10, 38157928, 38094452, 38092392, 61014312, 61079848),
    ("densenetd40k12", 100, 233008, 229036, 228784, None, None),
])
def test_parameter_counts(arch, c, gl, one, clilr, dml, mulstu):
    n = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):  # shapes only
        _check_counts(n, arch, c, gl, one, clilr, dml, mulstu)


def _check_counts(n, arch, c, gl, one, clilr, dml, mulstu):
    assert n(OKDDipBranches(arch, c)) == gl
    assert n(ONEBranches(arch, c)) == one
    assert n(ONEBranches(arch, c, avg=True)) == clilr
    if dml:
        assert n(IndependentNets(arch, c)) == dml
        assert n(IndependentNets(arch, c, attention=True)) == mulstu


def test_resnet34_and_three_branch_okddip():
    assert sum(p.numel() for p in plain_network("resnet34", 1000).parameters()) == 21797672
    model = OKDDipBranches("resnet32", 10, num_branches=3)  # crashed in the released script
    out = model(torch.randn(4, 3, 32, 32))
    assert out["pro"].shape == (4, 10, 2) and out["attention"].shape == (4, 2, 2)
    loss, terms = okddip_loss(out, torch.tensor([0, 1, 2, 3]), 1.0)
    loss.backward()
    assert model.query_weight.weight.grad is not None  # learns only through the (non-detached) targets


def test_ramp_and_lr_schedule():
    assert ramp_weight(0, 300) == math.exp(-5) == 0.006737946999085467  # float64, as the released numpy
    assert ramp_weight(40, 300) == 0.2865047968601901
    assert ramp_weight(80, 300) == ramp_weight(200, 300) == 1.0
    lrs = [lr_at(e, 0.1, [150, 225]) for e in (149, 150, 224, 225)]
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.001])  # torch-1.0.1 alignment, not one epoch early


def test_kl_t_has_epsilon_and_t_squared():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    q = torch.softmax(t / 3, 1) + 1e-7
    ref = 9 * (q * (q.log() - torch.log_softmax(s / 3, 1))).sum() / 4
    assert kl_t(s, t, 3.0).item() == pytest.approx(ref.item(), rel=1e-6)


def _run(module, argv, root, run_dir, dataset="CIFAR10"):
    data = os.path.join(root, "imagenet") if dataset == "imagenet" else str(root)
    module.main(list(argv) + ["--dataset", dataset, "--data-root", data, "--run-dir", str(run_dir)] + TINY)
    return read_log(str(run_dir))


@pytest.mark.parametrize("script,flags,key", [
    ("train_GL", ["--ensemble"], "test/ensemble/top1"),
    ("train_one", ["--ind"], "test/mean/top1"),
    ("train_DML", ["--type"], "test/mean/top1"),
])
def test_smoke_methods(script, flags, key, synthetic_root, tmp_path):
    """The variants that tests/test_okddip_runs.py does not train (it kills and resumes every method)."""
    import importlib
    module = importlib.import_module(f"okddip.{script}")
    log = _run(module, flags + ["--num_epochs", "1"], synthetic_root, tmp_path)
    rec = log[-1]
    assert rec["epoch"] == 1 and key in rec and "train/loss" in rec and "test/mean/top1" in rec
    assert math.isfinite(rec["train/loss"])
    for f in ("checkpoint.pt", "epoch_end.pt", "last.pth", "best.pth", "test_best_metrics.json", "args.json",
              "parameters.json", "finished"):
        assert (tmp_path / f).exists(), f


def test_loss_falls_and_kd_uses_train_teacher(synthetic_root, tmp_path):
    from okddip import train, train_kd
    teacher = tmp_path / "teacher"
    train.main(["--dataset", "CIFAR10", "--data-root", str(synthetic_root), "--run-dir", str(teacher),
                "--num_epochs", "2", "--steps-per-epoch", "4", "--eval-batches", "1", "--batch_size", "16",
                "--num_workers", "0", "--lr", "0.05", "--seed", "1", "--quiet"])
    log = read_log(str(teacher))
    assert log[-1]["train/loss"] < log[0]["train/loss"]
    student = tmp_path / "student"
    _run(train_kd, ["--T_model", "resnet32", "--T_model_path", str(teacher)], synthetic_root, student)
    rec = read_log(str(student))[-1]
    assert rec["train/teacher_loss"] > 0 and math.isfinite(rec["train/loss"])
    with pytest.raises(SystemExit) as e:  # wrong teacher architecture for these weights: a clear error
        _run(train_kd, ["--T_model", "resnet110", "--T_model_path", str(teacher)], synthetic_root, tmp_path / "x")
    assert e.value.code == 2 and not (tmp_path / "x").exists()  # refused before the run folder is made


@pytest.mark.parametrize("script,argv,msg", [
    ("train_GL", ["--model", "resnet50"], "valid:"),
    ("train_GL", ["--num_branches", "2"], "at least"),
    ("train_GL", ["--dataset", "MNIST"], "invalid choice"),
    ("train_GL", ["--lr", "-0.1"], "--lr must be positive"),
    ("train_GL", ["--alpha", "-1"], "--alpha must be >= 0"),
    ("train_GL", ["--branch_dropout", "1"], "--branch_dropout"),
    ("train", ["--batch_size", "0"], "--batch_size must be positive"),
    ("train", ["--num_epochs", "0"], "--num_epochs must be positive"),
    ("train", ["--schedule", "-5"], "--schedule must be >= 0"),
    ("train", ["--dropout", "1.5"], "--dropout must be below 1"),
    ("train", ["--dataset", "imagenet", "--model", "resnet34", "--data-on-device"], "--data-on-device"),
    ("train_DML", ["--wd=-1e-4"], "--wd must be >= 0"),
    ("train_one", ["--temperature", "0"], "--temperature must be positive"),
    ("train_kd", ["--schedule", "10"], "unrecognized arguments: --schedule"),  # released: 50 % / 75 % only
])
def test_bad_flags_are_parser_errors(script, argv, msg, tmp_path, capsys):
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"okddip.{script}").main(argv + ["--run-dir", str(tmp_path / "r")])
    assert e.value.code == 2 and msg in capsys.readouterr().err  # argparse's usage line and message
    assert not (tmp_path / "r").exists()  # nothing written


def test_missing_data_is_clear(tmp_path):
    from common.data import DatasetNotFoundError
    from okddip import train
    with pytest.raises(DatasetNotFoundError):
        train.main(["--data-root", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "r")] + TINY)
    assert not (tmp_path / "r").exists()  # the same command works once the data is there


@pytest.mark.slow
def test_okddip_on_imagenet_under_torchrun(synthetic_root, tmp_path):
    """Branch-based OKDDip with the ImageNet ResNet-34, 2 gloo processes: rank 0 alone writes one log line."""
    import subprocess
    import sys
    okddip_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "okddip")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train_GL.py", "--dataset", "imagenet", "--model", "resnet34", "--num_epochs", "1",
                          "--steps-per-epoch", "1", "--eval-batches", "1", "--batch_size", "4", "--num_workers", "0",
                          "--data-root", os.path.join(synthetic_root, "imagenet"), "--run-dir", str(tmp_path),
                          "--quiet"], cwd=okddip_dir, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "find_unused_parameters" not in out.stderr  # DDP only looks for unused parameters where some are
    log = read_log(str(tmp_path))
    assert len(log) == 1 and math.isfinite(log[0]["train/loss"]) and "test/leader/top1" in log[0]
