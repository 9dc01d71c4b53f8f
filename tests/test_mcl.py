"""L-MCL (mcl/): architectures against the authors' fingerprints, parity with the reference fixtures, training
scripts on synthetic data, resume, bad flags."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from common.logging import read_log
from common.options import detached_setup
from common.parity import floating_dtypes
from conftest import REPO, shared_file
from common.fast import Fast
from mcl.lmcl import MetaStep
from mcl.losses import mcl_loss
from mcl.main_layer_mcl_cifar_meta import build_modules, get_args_parser
from mcl.models import Aggregator, EmbedHeads, LossWeightNetwork, build_cifar_baseline, build_cifar_pair, networks_of
from mcl.parity import check
from mcl.runs import BaselineRun, LMCLRun


def count(module):
    return sum(p.numel() for p in module.parameters())


# spec 2.7: deployed backbone and auxiliary-branch parameters of every CIFAR network (100 classes)
PARAMS = {"resnet32": (472756, 809096), "resnet56": (861620, 1475208), "resnet110": (1170868, 2011080),
          "wrn_16_2": (703284, 1208200), "wrn_40_2": (2255156, 3867528), "wrn_28_4": (5872180, 10089032),
          "ShuffleNetV2_05x": (444292, 827768), "ShuffleNetV2_1x": (1356104, 2406252),
          "hcgnet_A1": (1102651, 1478429), "hcgnet_A2": (3133679, 4114546)}


def layout(module):
    return [[k, list(v.shape)] for k, v in module.state_dict().items()]


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_match_the_authors_models(name):
    with torch.device("meta"):  # shapes only: no memory, no init
        net = networks_of(build_cifar_pair(f"lmcl_{name}_cifar"))[0]
        baseline = build_cifar_baseline(f"{name}_cifar")
    assert (count(net.backbone), count(net.auxiliary_classifier)) == PARAMS[name]
    assert count(baseline) == PARAMS[name][0]  # the baseline is the deployed backbone


def test_state_dict_layout_and_loss_modules_match_fingerprint(mcl_fingerprint):
    """Every CIFAR pair of the script against the authors' fingerprint: state-dict keys, shapes and order, forward
    shapes, widths, the loss-side modules, every parameter count."""
    spec = json.loads(mcl_fingerprint.read_text())
    with torch.device("meta"):
        pair = build_cifar_pair(spec["arch"])
        features, logits = pair.eval()(torch.zeros(2, 3, 32, 32))
        rep_dim = [f[0].size(1) for f in features]
        modules = {"criterion_mcl": EmbedHeads(rep_dim, 3), "aggregator": Aggregator(rep_dim, 3),
                   "loss_weight_network": LossWeightNetwork(spec["feat_dims"])}
    assert layout(pair) == spec["state_dict"]["net"]
    assert [[list(h.shape) for h in f] for f in features] == spec["forward"]["embeddings_shapes"]
    assert [[list(z.shape) for z in n] for n in logits] == spec["forward"]["logits_shapes"]
    assert rep_dim == spec["rep_dim"] and [[h.size(1) for h in f] for f in features] == spec["feat_dims"]
    for key, module in modules.items():
        assert layout(module) == spec["state_dict"][key]
    counts = spec["param_counts"]
    assert count(pair) == counts["pair_total"]
    assert count(modules["criterion_mcl"]) == counts["criterion_mcl_embed_heads"]
    assert count(modules["aggregator"]) == counts["aggregator"]
    assert count(modules["loss_weight_network"]) == counts["loss_weight_network"]
    for net, (prefix, split) in zip(networks_of(pair), counts["per_network"].items()):
        assert (count(net.backbone), count(net.auxiliary_classifier)) == (split["deployed_backbone"],
                                                                          split["auxiliary_branches"])


def default_init_draws(build):
    """Names of the parameters in the order PyTorch's default init draws them from the RNG while BUILD() runs."""
    drawn = []
    originals = {name: getattr(torch.nn.init, name) for name in ("kaiming_uniform_", "uniform_")}

    def recording(init):
        def draw(tensor, *args, **kwargs):
            if not drawn or drawn[-1] is not tensor:  # the meta device's mode re-enters the call once
                drawn.append(tensor)
            return init(tensor, *args, **kwargs)
        return draw
    try:
        for name, init in originals.items():
            setattr(torch.nn.init, name, recording(init))
        with torch.device("meta"):
            module = build()
    finally:
        for name, init in originals.items():
            setattr(torch.nn.init, name, init)
    names = {id(p): k for k, p in module.named_parameters()}
    return [names[id(t)] for t in drawn]


def authors_draw_order(keys):
    """The order in which the authors' seeded default init draws the conv/linear parameters of a state dict with
    KEYS: their model files build every module in state-dict order, except that a ResNet block's projection shortcut
    (`downsample`) is built before the block it is passed into (the shipped fixture's weights confirm it for
    ResNet-32: test_seeded_modules_are_the_authors_initial_weights)."""
    batch_norms = {k.rsplit(".", 1)[0] for k in keys if k.endswith("running_mean")}
    drawn = [k for k in keys if k.endswith((".weight", ".bias")) and k.rsplit(".", 1)[0] not in batch_norms]
    order = []
    for k in drawn:
        block, _, rest = k.partition(".downsample.")
        if rest:  # move it before the block's first drawn parameter
            first = next(i for i, o in enumerate(order) if o.startswith(block + "."))
            order.insert(first, k)
        else:
            order.append(k)
    return order


def test_construction_draws_the_initial_weights_in_the_authors_order(mcl_fingerprint):
    """Ours draws the conv/linear weights and biases from the seeded RNG in the authors' order (the later
    re-initialisation of ResNet/WRN convs walks the modules in state-dict order in both)."""
    spec = json.loads(mcl_fingerprint.read_text())
    expected = authors_draw_order([k for k, _ in spec["state_dict"]["net"]])
    assert default_init_draws(lambda: build_cifar_pair(spec["arch"])) == expected


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_baseline_keys_are_the_deployed_backbone_keys(name):
    """spec 4: a baseline holds the pair's backbone keys, with ResNet's `fc` named `classifier` and HCGNet's blocks
    nested under `features.` (WRN and ShuffleNetV2 keys are the same)."""
    spec = json.loads(shared_file("mcl", f"lmcl_{name}_cifar.json").read_text())
    prefix = "module_list.0.backbone."
    backbone = [[k[len(prefix):], shape] for k, shape in spec["state_dict"]["net"] if k.startswith(prefix)]
    if name.startswith("resnet"):
        backbone = [[k.replace("fc.", "classifier.", 1) if k.startswith("fc.") else k, s] for k, s in backbone]
    if name.startswith("hcgnet"):
        backbone = [[k if k.startswith(("features.", "classifier.")) else "features." + k, s] for k, s in backbone]
    with torch.device("meta"):
        baseline = build_cifar_baseline(f"{name}_cifar")
    assert layout(baseline) == backbone


def test_seeded_modules_are_the_authors_initial_weights():
    """With --manual_seed 0 the script draws exactly the authors' initial pair, embed heads, aggregator and weight
    network: the shipped fixture stores theirs rounded to the fp16 grid."""
    from mcl.parity import read
    fixture, state = read(shared_file("mcl", "lmcl_resnet32_cifar_fixture.pt"))
    args = get_args_parser().parse_args(["--arch", fixture["args"]["arch"]])
    torch.manual_seed(fixture["args"]["manual_seed"])
    modules, shape = build_modules(args, torch.device("cpu"))
    refs = (state, fixture["weights"]["criterion_mcl"], fixture["weights"]["aggregator"],
            fixture["weights"]["loss_weight_network"])
    for module, ref in zip(modules, refs):
        ours = module.state_dict()
        assert list(ours) == list(ref)
        for k, v in ref.items():
            assert torch.equal(ours[k].half().float() if v.is_floating_point() else ours[k],
                               v.float() if v.is_floating_point() else v), k
    assert (shape.rep_dim, shape.feat_dims) == (fixture["args"]["rep_dim"], fixture["args"]["feat_dims"])


def test_float64_forward_loss_and_meta_step_never_make_a_float32_tensor():
    torch.manual_seed(0)
    args = get_args_parser().parse_args(["--times", "1"])  # one virtual step of each kind (MCL, CE): every path
    pair = build_cifar_pair(args.arch).double().train()
    modules = (pair, *(m.double() for m in (EmbedHeads([64, 64], 3), Aggregator([64, 64], 3),
                                            LossWeightNetwork([[64] * 3] * 2))))
    run = LMCLRun(detached_setup(Fast()), args, modules)
    baseline = BaselineRun(detached_setup(Fast()), args, build_cifar_baseline("resnet32_cifar").double(), None)
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([3, 3])
    with floating_dtypes() as seen:
        lmcl = run.train_step(0, x, y)  # batch 0: the ordinary step and the meta step
        loss = baseline.train_step(0, x, y)["loss"]
    assert set(seen) == {torch.float64}, seen
    assert lmcl["loss"].dtype == loss.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_meta_recompute_gives_the_same_hypergradient_bit_for_bit(dtype):
    """--meta-recompute (the authors' order: each virtual step's graph rebuilt in the reverse sweep) and the default
    (graphs kept) make the same hypergradient and record, bit for bit; the profile shows the rebuilt passes."""
    from common.bench import phases
    torch.manual_seed(0)
    args = get_args_parser().parse_args([])
    modules, _ = build_modules(args, torch.device("cpu"))
    meta = MetaStep(*(m.to(dtype) for m in (modules[0], modules[1], modules[3])), args)
    x, y = torch.randn(4, 3, 32, 32, dtype=dtype), torch.tensor([5, 5, 7, 7])
    kept = meta.hypergradient(x, y, 0.01)  # (a small lr: random images, whose float32 trajectory overflows at 0.1)
    kept_record = meta.record
    meta.recompute = True
    found = phases(lambda: meta.hypergradient(x, y, 0.01), ratio=1.0)
    rebuilt = meta.hypergradient(x, y, 0.01)
    assert all(torch.isfinite(g).all() for g in kept.values()) and any(g.abs().sum() > 0 for g in kept.values())
    assert all(torch.equal(kept[k], rebuilt[k]) for k in kept)
    assert [float(c["loss_mcl"]) for c in kept_record["inner"]] == [float(c["loss_mcl"]) for c in meta.record["inner"]]
    assert [float(v) for v in kept_record["outer"]] == [float(v) for v in meta.record["outer"]]
    assert [k for k in found if "again" in k] == [f"L_{s} and its gradient again at theta_{s} (graph for the second "
                                                  f"order)" for s in (2, 1, 0)]


def test_bad_architecture_names_and_depths_are_explained():
    with pytest.raises(ValueError, match="lmcl_res32_res110_cifar"):
        build_cifar_pair("lmcl_resnet33_cifar")
    with pytest.raises(ValueError, match="resnet32_cifar"):
        build_cifar_baseline("resnet32")
    from mcl.models.wrn_cifar import WideResNetCIFAR
    with pytest.raises(ValueError, match="multiple of 6"):
        WideResNetCIFAR(17, 2)


def test_mcl_loss_duplicates_ordered_pairs_and_needs_positives():
    torch.manual_seed(0)
    emb = [[torch.nn.functional.normalize(torch.randn(6, 16), dim=1) for _ in range(3)] for _ in range(2)]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    weights = [torch.rand(6) for _ in range(9)]
    weights = weights + [weights[3 * z + k] for k in range(3) for z in range(3)]  # (1,0,k,z) = (0,1,z,k)
    out = mcl_loss(emb, weights, labels)
    first = sum(b["icl"] for b in out["mcl_breakdown"][:9])
    assert torch.allclose(out["icl"], 2 * first)  # both orderings summed: exactly twice the 9-pair sum
    assert torch.allclose(out["loss_mcl"], 0.1 * out["vcl"] + out["soft_vcl"] + 0.1 * out["icl"] + out["soft_icl"])
    # the cross-network diagonal is neither positive nor in the denominator: identical embeddings do not help
    same = [[emb[0][0]] * 3, [emb[0][0]] * 3]
    assert torch.isfinite(mcl_loss(same, [torch.ones(6)] * 18, labels)["icl"])


def test_training_loss_falls_on_a_fixed_batch():
    from types import SimpleNamespace
    from mcl.lmcl import training_loss
    torch.manual_seed(0)
    pair = build_cifar_pair("lmcl_resnet32_cifar")
    embed, aggregator, weight_net = EmbedHeads([64, 64], 3), Aggregator([64, 64], 3), LossWeightNetwork([[64] * 3] * 2)
    args = SimpleNamespace(kd_T=3.0, tau=0.1, alpha=0.1, gamma=1.0, beta=0.1, lam=1.0)
    params = list(pair.parameters()) + list(embed.parameters()) + list(aggregator.parameters())
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(4).repeat_interleave(2)
    losses = []
    for _ in range(4):
        out = training_loss(pair, embed, aggregator, weight_net, x, y, args)
        optimizer.zero_grad()
        out["total"].backward()
        optimizer.step()
        losses.append(out["total"].item())
    assert losses[-1] < losses[0]


def test_parity_fixture(mcl_fixture):
    """The authors' fixture: every float32 item with tolerances from our measured rounding, every float64 item
    against their float64 reference, the meta step included (its exact hypergradient: the CLI test below)."""
    report = check(mcl_fixture, exact=False)
    assert report.ok, report.format()
    assert "float64.meta.hypergradient (original)" in [i.name for i in report.items if i.status == "ok"]


@pytest.mark.slow
def test_parity_checker_cli():
    """python -m mcl.parity: every item of every fixture, the exact hypergradient included."""
    shared_file("mcl", "lmcl_resnet32_cifar_fixture.pt")
    result = subprocess.run([sys.executable, "-m", "mcl.parity"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "float64.meta.hypergradient (exact)" in result.stdout and "fixtures match" in result.stdout


def run_script(script, args, cwd=REPO / "mcl", env=None, check=True):
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


BASELINE_SMOKE = ["--arch", "resnet32_cifar", "--batch-size", "16", "--steps-per-epoch", "3", "--eval-batches", "1",
                  "--num-workers", "0", "--quiet", "--seed", "1"]
LMCL_SMOKE = ["--arch", "lmcl_resnet32_cifar", "--batch-size", "8", "--steps-per-epoch", "2", "--eval-batches", "1",
              "--meta-freq", "2", "--num-workers", "0", "--quiet", "--seed", "1"]
KILL = "OKD_KILL_AFTER_STEP"


def same_logs(a, b):
    timing = ("epoch_time", "train_time", "images_per_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in a] == \
        [{k: v for k, v in r.items() if k not in timing} for r in b]


def killed_and_resumed(script, args, tmp_path, kill_after):
    """(uninterrupted run folder, run folder killed after KILL_AFTER steps then resumed): both finished."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_script(script, args + ["--run-dir", full])
    killed = run_script(script, args + ["--run-dir", cut, "--save-every-steps", "1"], env={KILL: str(kill_after)},
                        check=False)
    assert killed.returncode != 0 and not (cut / "finished").exists()
    assert len(read_log(cut)) == (kill_after - 1) // 3  # killed inside an epoch (3 steps each)
    run_script(script, args + ["--run-dir", cut, "--resume"])
    return full, cut


def run_state(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["run"]


def test_baseline_smoke_and_mid_epoch_resume_is_bit_exact(synthetic_root, tmp_path):
    args = BASELINE_SMOKE + ["--epochs", "2", "--data-root", synthetic_root]
    full, cut = killed_and_resumed("main_cifar_baseline.py", args, tmp_path, kill_after=5)
    log = read_log(full)
    assert [r["epoch"] for r in log] == [1, 2]
    assert {"train/loss", "train/net/top1", "test/net/loss", "test/net/top1", "test/net/top5", "lr"} <= set(log[0])
    assert log[1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 2)))  # epoch-wise cosine, epoch 1 of 2
    assert (full / "best.pt").exists() and (full / "finished").exists()
    a, b = run_state(full), run_state(cut)
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert a["optimizer"]["state"][0]["momentum_buffer"].equal(b["optimizer"]["state"][0]["momentum_buffer"])
    assert same_logs(read_log(full), read_log(cut))


def test_lmcl_smoke_with_meta_step_and_mid_epoch_resume_is_bit_exact(synthetic_root, tmp_path):
    """Two epochs of 3 steps, a meta step at batches 0 and 2 of each; killed after step 4 (epoch 2's first step,
    a meta step) and resumed: weights, both optimizers, the sampler and the log end identical."""
    args = LMCL_SMOKE + ["--epochs", "2", "--steps-per-epoch", "3", "--data-root", synthetic_root]
    full, cut = killed_and_resumed("main_layer_mcl_cifar_meta.py", args, tmp_path, kill_after=4)
    record = read_log(full)[0]
    for key in ("train/loss", "train/loss_cls", "train/loss_logit_kd", "train/loss_vcl", "train/loss_soft_vcl",
                "train/loss_icl", "train/loss_soft_icl", "train/net1/aux1/top1", "train/net2/aggregated/top1",
                "test/net1/top1", "test/net2/aux2/top5", "test/net1/max_heads/top1", "test/max_heads/top1", "lr"):
        assert key in record, key
    a, b = run_state(full), run_state(cut)
    assert {"net", "criterion_mcl", "aggregator", "loss_weight_network", "optimizer", "weight_optimizer",
            "sampler"} <= set(a)
    for key in ("net", "criterion_mcl", "aggregator", "loss_weight_network"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    weight_momentum = [s["momentum_buffer"] for s in a["weight_optimizer"]["state"].values()]
    assert weight_momentum and all(m.equal(n["momentum_buffer"]) for m, n in
                                   zip(weight_momentum, b["weight_optimizer"]["state"].values()))
    assert a["sampler"] == b["sampler"]
    # 6 steps + one extra BatchNorm update per meta step (4 of them)
    assert a["net"]["module_list.0.backbone.bn1.num_batches_tracked"].item() == 10
    assert same_logs(read_log(full), read_log(cut))


# log name -> (training_loss key, weight flag); the paper's weights, written out here rather than read from LOSS_LOG
LOGGED_TERMS = {"loss": ("total", None), "loss_cls": ("loss_cls", None), "loss_logit_kd": ("loss_logit_kd", None),
                "loss_vcl": ("vcl", "alpha"), "loss_soft_vcl": ("soft_vcl", "gamma"), "loss_icl": ("icl", "beta"),
                "loss_soft_icl": ("soft_icl", "lam")}


def recorded_steps(monkeypatch, cls, name, batch_of, terms_of):
    """Wrap method NAME of CLS so that every call appends (batch size, {term: float}) to the returned list."""
    steps, step = [], getattr(cls, name)

    def recording(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        steps.append((batch_of(args), {k: v.item() for k, v in terms_of(out).items()}))
        return out
    monkeypatch.setattr(cls, name, recording)
    return steps


def weighted_mean(steps, key, weight=1.0):
    # as the former per-step .item() meters summed: Python float64 weight x term, times the batch size
    total = 0.0
    for n, terms in steps:
        total += weight * terms[key] * n
    return total / sum(n for n, _ in steps)


def test_lmcl_logged_train_losses_are_weighted_means_of_the_step_terms(synthetic_root, tmp_path, monkeypatch):
    """train/<term> = sum over steps of weight x term x batch size / samples, from the terms each step returned.
    Distinct weights, so a swapped or missing weight shows; the means must be the same bits as the former meters'.
    (The class-balanced sampler makes equal batches; the baseline test below has a short last batch.)"""
    import mcl.main_layer_mcl_cifar_meta as script
    keys = [key for key, _ in LOGGED_TERMS.values()]
    steps = recorded_steps(monkeypatch, LMCLRun, "ordinary_step", lambda a: a[0].size(0),
                           lambda out: {k: out[k].detach() for k in keys})
    weights = {"alpha": 0.3, "gamma": 0.7, "beta": 0.2, "lam": 1.5}
    run = tmp_path / "lmcl"
    script.main(LMCL_SMOKE + ["--steps-per-epoch", "3", "--epochs", "1", "--data-root", str(synthetic_root),
                              "--run-dir", str(run), "--meta-freq", "50"] + [f"--{k}={v}" for k, v in weights.items()])
    (record,) = read_log(run)
    assert len(steps) == 3 and all(n == 8 for n, _ in steps)
    for name, (key, flag) in LOGGED_TERMS.items():
        assert record[f"train/{name}"] == weighted_mean(steps, key, weights[flag] if flag else 1.0), name
    # and the logged terms add up to the logged total: no term missing, the weights logged are the loss's own
    parts = sum(record[f"train/{name}"] for name in LOGGED_TERMS if name != "loss")
    assert record["train/loss"] == pytest.approx(parts, rel=1e-5)


def test_baseline_logged_train_loss_is_the_per_sample_mean(synthetic_root, tmp_path, monkeypatch):
    """600 synthetic images in batches of 256: 256, 256, 88, so a mean over batches instead of samples shows."""
    import mcl.main_cifar_baseline as script
    steps = recorded_steps(monkeypatch, BaselineRun, "train_step", lambda a: a[1].size(0),
                           lambda out: {"loss": out["loss"]})
    run = tmp_path / "baseline"
    script.main(BASELINE_SMOKE + ["--batch-size", "256", "--steps-per-epoch", "0", "--epochs", "1", "--data-root",
                                  str(synthetic_root), "--run-dir", str(run)])
    (record,) = read_log(run)
    assert [n for n, _ in steps] == [256, 256, 88]
    assert record["train/loss"] == weighted_mean(steps, "loss")


@pytest.mark.parametrize("script,args,message", [
    ("main_layer_mcl_cifar_meta.py", ["--arch", "lmcl_resnet31_cifar"], "lmcl_resnet32_cifar"),
    ("main_layer_mcl_cifar_meta.py", ["--batch-size", "7"], "must be even"),
    ("main_layer_mcl_cifar_meta.py", ["--meta-freq", "0"], "--meta-freq must be positive"),
    ("main_cifar_baseline.py", ["--arch", "resnet31_cifar"], "resnet32_cifar"),
    ("main_cifar_baseline.py", ["--lr-type", "step"], "invalid choice"),
    # the authors' scripts train on CIFAR-100 whatever --dataset says (it only named the folder): refused
    ("main_cifar_baseline.py", ["--dataset", "cifar10"], "argument --dataset: invalid choice: 'cifar10'"),
    ("main_layer_mcl_cifar_meta.py", ["--dataset", "cifar10"], "argument --dataset: invalid choice: 'cifar10'"),
    ("main_layer_mcl_cifar_meta.py", ["--init-lr", "-0.1"], "--init-lr must be positive"),
    ("main_cifar_baseline.py", ["--weight-decay", "-1"], "--weight-decay must be >= 0"),
])
def test_bad_flags_fail_clearly_before_writing(tmp_path, capsys, script, args, message):
    import importlib
    main = importlib.import_module("mcl." + script.removesuffix(".py")).main  # in process: argparse exits the same
    with pytest.raises(SystemExit) as exit_status:
        main(args + ["--run-dir", str(tmp_path / "run"), "--data-root", str(tmp_path)])
    assert exit_status.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_dataset_is_a_clear_error(tmp_path):
    result = run_script("main_cifar_baseline.py", ["--data-root", tmp_path / "nowhere", "--run-dir", tmp_path / "r",
                                                   "--quiet"], check=False)
    assert result.returncode != 0 and "not found" in result.stderr


def test_scripts_run_as_modules():
    result = subprocess.run([sys.executable, "-m", "mcl.main_layer_mcl_cifar_meta", "--help"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--fixed-meta-grad" in result.stdout


def test_published_tables_are_well_formed():
    from mcl.published import SMOKE, TABLES
    assert [t.id for t in TABLES] == ["table8", "table9", "table10"]
    rows = [r for t in TABLES for r in t.rows]
    assert all(r.match["script"].startswith("mcl/") and (REPO / "mcl" / r.argv[0]).exists() for r in rows)
    assert {r.value for r in rows if "ResNet-32, L-MCL" in r.name} == {75.82}
    assert all(set(r.scale_args) == {"smoke", "short"} for r in rows) and SMOKE


@pytest.mark.parametrize("depth", [32, 110])  # BasicBlock, Bottleneck
def test_in_place_resnet_blocks_give_the_out_of_place_bits(depth):
    """The CIFAR ResNet blocks' in-place ReLU and residual add: the same outputs, gradients and second-order
    gradients (what the meta step differentiates) bit for bit as the out-of-place formula, and the input unchanged."""
    from mcl.models.resnet_cifar import make_layer, DEPTHS
    F = torch.nn.functional
    torch.manual_seed(0)
    block_type = DEPTHS[depth][0]
    block = make_layer(block_type, 16, 16, 1, 2)[0].double().train()  # with its downsample shortcut
    convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
    bns = [block.bn1, block.bn2] + ([block.bn3] if hasattr(block, "bn3") else [])

    def out_of_place(x):
        out = x
        for i, (conv, bn) in enumerate(zip(convs, bns)):
            out = bn(conv(out))
            out = F.relu(out) if i < len(convs) - 1 else out
        return F.relu(out + block.downsample(x))

    x = torch.randn(4, 16, 8, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for forward in (block, out_of_place):
        x_before = x.detach().clone()
        y = forward(x)
        assert torch.equal(x.detach(), x_before)
        params = [x] + list(block.parameters())
        grads = torch.autograd.grad(y.square().sum(), params, create_graph=True)
        second = torch.autograd.grad(sum(g.sum() for g in grads), params)
        results.append([y.detach()] + [g.detach() for g in grads] + list(second))
    assert all(torch.equal(a, b) for a, b in zip(*results))
