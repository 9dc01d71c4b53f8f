"""FFSD parity checker (ffsd/parity.py on common/parity.py).

The shipped fixture passes with every float32 tolerance derived from measured rounding; fixtures of the same schema
built here from our own code for other configurations (model, number of students, seeds, epochs, float16 weights,
a float64 reference) load and pass, and fail where they are altered; deliberately wrong variants of the training
code, injected by monkeypatching, fail on the item that must see them; float64 runs stay float64 end to end.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import shared_file

from common.parity import FixtureError, floating_dtypes
from ffsd import losses, parity, training
from ffsd.models import CIFAR_MODELS, IMAGENET_MODELS, create_model

pytestmark = pytest.mark.usefixtures("one_thread")


FIXTURE_LOSS_NAMES = {"fusion/kl": "fusion/kl_to_student_mean_logits (T^2*KL)",
                      "leader/kl": "leader/kl_to_fusion (T^2*KL)"}


def sums(t):
    t = t.detach().double()
    return t.sum().item(), t.pow(2).sum().item()


def build_fixture(model="resnet20", model_num=2, init_seed=0, batch_seed=1, epochs=(6, 1), fp16=False,
                  float64_reference=True):
    """A fixture written to SCHEMA.md (FFSD) by this repository's own code, for any configuration the scripts run."""
    config = {"model": model, "init_seed": init_seed, "batch_seed": batch_seed, "epochs": list(epochs),
              "weights_fp16_rounded": fp16}
    torch.manual_seed(batch_seed)
    inputs, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    torch.manual_seed(init_seed)
    nets = training.build_networks(model, "cifar100", model_num)
    init_state = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in
                  nets.named_networks().items()}
    fixture = {"meta": {"description": "built from this repository's code", "config": config}, "inputs": inputs,
               "labels": labels, "init_state": init_state}
    if fp16:
        fixture["init_state_exact_checksums"] = {f"{n}.{k}": sums(v) for n, s in init_state.items()
                                                 for k, v in s.items()}
        fixture["init_state"] = {n: {k: v.half() if v.is_floating_point() else v for k, v in s.items()}
                                 for n, s in init_state.items()}
    reference64 = {}
    for dtype, target in ((torch.float32, fixture), (torch.float64, reference64)):
        target["outputs_eval_mode_init"] = parity.eval_logits(fixture, config, model_num, dtype)
        for epoch in epochs:
            step = parity.one_step(fixture, config, model_num, epoch, dtype)
            target.setdefault("outputs_train_mode", step["outputs"])
            terms = {FIXTURE_LOSS_NAMES.get(k, k.replace("sd_", "sd_decoder_")): v.item() for k, v in
                     step["terms"].items()}
            key = f"losses_epoch{epoch}_{'full_lambdas' if epoch >= 5 else 'warmup'}"
            target[key] = dict(terms, **step["hyperparameters"])
            target[f"post_step_checksums_epoch{epoch}"] = {k: sums(v) for k, v in step["state"].items()}
            if dtype == torch.float32:
                capture = {k: v for k, v in step["terms"].items() if not k.endswith("_raw")}
                capture.update({"student0/diversity": 0.0, "student0/self_distillation": 0.0})
                capture = {k.replace("sd_", "sd_decoder_"): float(v) for k, v in capture.items()}
                acc = {k.replace("/top1", "/acc"): v.item() for k, v in step["accuracies"].items()}
                acc["average_acc"], acc["ensemble(oracle)_acc"] = acc.pop("average/acc"), acc.pop("ensemble_oracle/acc")
                target[f"real_step_capture_epoch{epoch}"] = dict(capture, **acc)
    if float64_reference:
        fixture["float64_reference"] = dict(reference64, note="the same keys, networks, weights and input in float64")
    return fixture


def check(fixture, tmp_path, name="built_fixture.pt", **args):
    path = tmp_path / name
    torch.save(fixture, path)
    return parity.check_fixture(path, type("Args", (), args)())


def assert_passes(report):
    assert report.ok, report.format()


# ------------------------------------------------------------------------------------------- the shipped one ----
def test_shipped_fixture_passes_on_rules_derived_here(ffsd_fixture):
    report = parity.check_fixture(ffsd_fixture)
    assert_passes(report)
    decided = {i.name for i in report.items if i.status == "ok"}
    for epoch, suffix in ((6, "full_lambdas"), (1, "warmup")):
        for name in (f"losses_epoch{epoch}_{suffix}", f"losses_epoch{epoch} hyperparameters",
                     f"real_step_capture_epoch{epoch}", f"real_step_capture_epoch{epoch} accuracies",
                     f"post_step_checksums_epoch{epoch}"):
            assert name in decided, report.format()
    assert {"init regeneration (seed 0)", "outputs_eval_mode_init", "outputs_train_mode"} <= decided


# ------------------------------------------------------------------------- fixtures of other configurations ----
CONFIGS = [  # (configuration, whether to also check an altered copy)
    pytest.param(dict(model="resnet20", model_num=3, init_seed=7, batch_seed=3, epochs=(3,), fp16=True), True,
                 id="resnet20-M3-seed7-epoch3-fp16"),
    pytest.param(dict(model="wideresnet1602", init_seed=1, epochs=(8,)), False, id="wideresnet1602-seed1-epoch8"),
] + [pytest.param(dict(model=m, epochs=(5, 2), fp16=True), True, id=f"{m}-epochs5,2-fp16", marks=pytest.mark.slow)
     for m in ("resnet32", "resnet56", "wideresnet4002", "densenet", "googlenet")]


@pytest.mark.parametrize("config,alter", CONFIGS)
def test_fixtures_of_other_configurations_pass_and_fail_where_altered(config, alter, tmp_path):
    fixture = build_fixture(**config)
    report = check(fixture, tmp_path)
    assert_passes(report)
    assert f"M = {config.get('model_num', 2)}" in report.title and config["model"] in report.title
    names = {i.name for i in report.items}
    epoch = config["epochs"][0]
    checksums = f"post_step_checksums_epoch{epoch}"
    assert {f"float64 {checksums}", "float64 outputs_train_mode", "float64 outputs_eval_mode_init"} <= names
    regeneration = f"init regeneration (seed {config.get('init_seed', 0)})" + \
        (", un-rounded checksums" if config.get("fp16") else "")
    assert regeneration in names
    if not alter:
        return

    altered = copy.deepcopy(fixture)
    losses_key = next(k for k in altered if parity.EPOCH_KEY.match(k) and f"epoch{epoch}_" in k)
    altered[losses_key]["leader/total"] *= 1.01
    last = f"student{config.get('model_num', 2) - 1}"
    key = last + "." + next(k for k, v in fixture["init_state"][last].items() if v.dim() == 2)  # the classifier
    s, sq = altered[checksums][key]
    altered[checksums][key] = (s, sq * (1 + 1e-2))
    s, sq = altered["float64_reference"][checksums][key]
    altered["float64_reference"][checksums][key] = (s, sq * (1 + 1e-8))
    altered["meta"]["config"]["init_seed"] += 1  # the stored weights no longer come from the stated seed
    report = check(altered, tmp_path, "altered_fixture.pt")
    regeneration = regeneration.replace(f"seed {config.get('init_seed', 0)}", f"seed {config.get('init_seed', 0) + 1}")
    assert set(report.failed()) == {losses_key, checksums, f"float64 {checksums}", regeneration}, report.format()


def skeleton_fixture(model="resnet20", model_num=2):
    """The part of a fixture read before anything is computed: configuration, batch, initial weights."""
    torch.manual_seed(0)
    nets = training.build_networks(model, "cifar100", model_num)
    return {"meta": {"config": {"model": model}}, "inputs": torch.randn(8, 3, 32, 32),
            "labels": torch.randint(0, 100, (8,)), "outputs_eval_mode_init": {}, "outputs_train_mode": {},
            "init_state": {n: net.state_dict() for n, net in nets.named_networks().items()}}


def test_configurations_the_scripts_do_not_run_are_failures_with_their_reason(tmp_path, capsys):
    paths = []
    for model, reason in (("resnet110", "not a model of the scripts"), ("resnet18", "ImageNet model")):
        fixture = skeleton_fixture()
        fixture["meta"]["config"]["model"] = model
        paths.append(tmp_path / f"{model}_fixture.pt")
        torch.save(fixture, paths[-1])
        with pytest.raises(FixtureError, match=reason):
            parity.check_fixture(paths[-1])
    one_student = skeleton_fixture()
    del one_student["init_state"]["student1"]
    with pytest.raises(FixtureError, match="M >= 2"):
        check(one_student, tmp_path)
    other_layout = skeleton_fixture()
    other_layout["init_state"]["leader"].pop("trans_fusion_module.conv1.weight")
    assert check(other_layout, tmp_path).failed() == ["init_state networks and keys"]
    torch.save(other_layout, tmp_path / "other_layout_fixture.pt")
    # the command line: one report per fixture, exit status 1 unless every fixture matches
    assert parity.main([str(p) for p in paths] + [str(tmp_path / "other_layout_fixture.pt")]) == 1
    out = capsys.readouterr().out
    assert out.count("cannot be checked") == 2 and "FAIL init_state networks and keys" in out
    assert "0/3 fixtures match" in out and "tolerance = 8 x max(measured float32 spread" in out


# -------------------------------------------------------------------------------- wrong variants must fail ----
@pytest.fixture(scope="module")
def one_epoch_fixture(tmp_path_factory):
    """The shipped fixture (the authors' values) reduced to its epoch-6 step, or one built here when it is absent."""
    try:
        fixture = torch.load(shared_file("ffsd", "resnet20_fixture.pt"), weights_only=False)
    except pytest.skip.Exception:
        fixture = build_fixture(float64_reference=False)
    fixture = {k: v for k, v in fixture.items() if "epoch1" not in k}
    path = tmp_path_factory.mktemp("ffsd_mutations") / "epoch6_fixture.pt"
    torch.save(fixture, path)
    return path


def optimizers_with(change, which=lambda name, optimizer: True):
    """training.build_optimizers, then CHANGE (a dict) applied to the parameter groups of the optimizers selected."""
    build = training.build_optimizers

    def mutated(*args, **kwargs):
        optimizers = build(*args, **kwargs)
        for name, optimizer in optimizers.items():
            if which(name, optimizer):
                for group in optimizer.param_groups:
                    group.update(change)
        return optimizers
    return mutated


def train_step_with_temperature(scale):
    step = training.train_step

    def mutated(nets, optimizers, inputs, labels, lambdas, temperature=2, *args, **kwargs):
        return step(nets, optimizers, inputs, labels, lambdas, temperature * scale, *args, **kwargs)
    return mutated


def kl_without_detach(student_logits, teacher_logits, temperature):
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean")


CHECKSUMS6 = {"post_step_checksums_epoch6"}
LOSSES6 = {"losses_epoch6_full_lambdas", "real_step_capture_epoch6"}
MUTATIONS = {  # name: (module, attribute, replacement (called with the original), the items that must fail)
    "weight decay off": (training, "build_optimizers", lambda: optimizers_with({"weight_decay": 0.0}), CHECKSUMS6),
    "nesterov flipped": (training, "build_optimizers", lambda: optimizers_with(
        {"nesterov": False}, lambda name, o: isinstance(o, torch.optim.SGD)), CHECKSUMS6),
    "KD weight T^2 x 1.01": (training, "kd_kl", lambda: lambda s, t, temp: 1.01 * losses.kd_kl(s, t, temp),
                             LOSSES6 | CHECKSUMS6),
    "temperature x 1.01": (training, "train_step", lambda: train_step_with_temperature(1.01), LOSSES6 | CHECKSUMS6),
    "DML teacher not detached": (losses, "kl_to_teacher", lambda: kl_without_detach, {"train_step epoch 6"}),
    "fusion weight decay x 10": (training, "FUSION_WEIGHT_DECAY", lambda: 10 * training.FUSION_WEIGHT_DECAY,
                                 CHECKSUMS6),
    "decoders' Adam weight decay 0": (training, "build_optimizers", lambda: optimizers_with(
        {"weight_decay": 0.0}, lambda name, o: name.startswith("sd_")), CHECKSUMS6),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_wrong_variants_fail_on_the_item_that_must_see_them(mutation, one_epoch_fixture, monkeypatch):
    module, attribute, replacement, must_fail = MUTATIONS[mutation]
    monkeypatch.setattr(module, attribute, replacement())
    report = parity.check_fixture(one_epoch_fixture, type("Args", (), {"no_regeneration": True})())
    failed = set(report.failed())
    assert must_fail <= failed, report.format()
    # nothing the variant leaves unchanged may fail: the forward at the initial weights is the same
    assert not failed & {"outputs_eval_mode_init", "outputs_train_mode"}, report.format()


# ----------------------------------------------------------------------------------- float64 and op order ----
@pytest.mark.parametrize("model", list(CIFAR_MODELS) + list(IMAGENET_MODELS))
def test_leader_forward_stays_float64_and_runs_trans_fusion_before_its_classifier(model):
    """float64 in, float64 everywhere; and the released op order (autograd then sums the gradients reaching the
    last map as the authors' code does)."""
    dataset = "imagenet" if model in IMAGENET_MODELS else "cifar100"
    torch.manual_seed(0)
    leader = create_model(model, dataset, leader=True).double().train()
    classifier = [m for m in leader.modules() if isinstance(m, torch.nn.Linear)][-1]
    calls = []
    leader.trans_fusion_module.register_forward_hook(lambda *_: calls.append("trans_fusion"))
    classifier.register_forward_hook(lambda *_: calls.append("classifier"))
    with floating_dtypes() as seen:
        logits, maps, trans_fusion = leader(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert set(seen) == {torch.float64}, seen
    assert logits.dtype == maps[-1].dtype == trans_fusion.dtype == torch.float64
    assert calls == ["trans_fusion", "classifier"]


def test_float64_training_step_and_every_loss_term_never_produce_float32():
    torch.manual_seed(0)
    nets = training.build_networks("resnet20", model_num=3).double()
    # SGD for all six networks here: Adam keeps its step counter as a float32 scalar, which is no forward or loss value
    optimizers = {name: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
                  for name, net in nets.named_networks().items()}
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randint(0, 100, (2,))
    nets.train()
    lambdas = training.warmed_up_lambdas({"diversity": 1e-5, "fusion": 10.0, "self_distillation": 1000.0}, 3)
    with floating_dtypes() as seen:  # the switches on: their code paths are a superset of the released ones
        terms, outputs = training.train_step(nets, optimizers, x, y, lambdas, follower_sd_weight="self_distillation",
                                             normalized_diversity_target=True)
        nets.eval()
        training.predict(nets, x)
    assert set(seen) == {torch.float64}, seen
    assert all(v.dtype == torch.float64 for v in terms.values())
    assert {"student2/diversity_raw", "sd_student2/feature_raw", "leader/self_distillation"} <= set(terms)
