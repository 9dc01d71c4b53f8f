"""The L-MCL parity checker (mcl/parity.py) can fail, and reads any fixture written to SCHEMA.md section 4.

Mutations: deliberately wrong variants of our own code, injected here by monkeypatching, run against the authors'
fixture; each must fail the checker on the item that checks what was broken. Fixtures of other configurations
(another pair, seed and batch, split weight files, float16 loss-side weights, CrossNets keys) are written here by our
own code in the schema's format: the checker must pass our code against them and fail a mutated variant.
"""
import hashlib

import pytest
import torch

import mcl.lmcl
import mcl.losses
from conftest import shared_file
from mcl.lmcl import MetaStep
from mcl.losses import mcl_pair_terms, weighted_soft_kl
from mcl.main_layer_mcl_cifar_meta import build_modules, get_args_parser
from mcl.parity import LOSS_GROUPS, check, iteration


def authors_fixture():
    return shared_file("mcl", "lmcl_resnet32_cifar_fixture.pt")


# ------------------------------------------------------------------------------------------------ mutations ----
def optimizer_mutation(monkeypatch, **changes):
    """torch.optim.SGD as make_optimizers builds it, with CHANGES applied to its arguments ({name: f(value)})."""
    sgd = torch.optim.SGD

    def mutated(params, **kwargs):
        return sgd(params, **{**kwargs, **{k: f(kwargs[k]) for k, f in changes.items()}})
    monkeypatch.setattr(torch.optim, "SGD", mutated)


def weight_decay_off(monkeypatch):
    optimizer_mutation(monkeypatch, weight_decay=lambda wd: 0.0)


def nesterov_flipped(monkeypatch):
    optimizer_mutation(monkeypatch, nesterov=lambda nesterov: not nesterov)


def vcl_weight_one_percent_up(monkeypatch):
    loss = mcl.lmcl.mcl_loss
    monkeypatch.setattr(mcl.lmcl, "mcl_loss", lambda e, w, y, tau, T, alpha, *rest: loss(e, w, y, tau, T,
                                                                                          alpha * 1.01, *rest))


def kd_temperature_one_percent_up(monkeypatch):
    kl = mcl.lmcl.distill_kl
    monkeypatch.setattr(mcl.lmcl, "distill_kl", lambda student, teacher, T: kl(student, teacher, T * 1.01))


def tau_one_percent_up(monkeypatch):
    loss = mcl.lmcl.mcl_loss
    monkeypatch.setattr(mcl.lmcl, "mcl_loss", lambda e, w, y, tau, *rest: loss(e, w, y, tau * 1.01, *rest))


def soft_vcl_teacher_not_detached(monkeypatch):
    def terms(e_a, e_b, weight, positives, off_diagonal, tau, T):
        vcl, _, icl, soft_icl = mcl_pair_terms(e_a, e_b, weight, positives, off_diagonal, tau, T)
        s_aa, s_bb = e_a @ e_a.T / tau, e_b @ e_b.T / tau
        soft_vcl = weighted_soft_kl(s_aa, s_bb, weight, T) + weighted_soft_kl(s_bb, s_aa, weight, T)
        return vcl, soft_vcl, icl, soft_icl
    monkeypatch.setattr(mcl.losses, "mcl_pair_terms", terms)


def meta_lr_one_percent_up(monkeypatch):
    step = MetaStep.step
    monkeypatch.setattr(MetaStep, "step", lambda self, x, y, lr, weight_optimizer: step(self, x, y, lr * 1.01,
                                                                                         weight_optimizer))


LOSS_ITEMS = [f"losses.{group}" for group in LOSS_GROUPS]
# mutation -> (items that must fail, items that must still pass: the forward values a gradient-only change keeps)
MUTATIONS = {
    weight_decay_off: (["main_step.param_delta_norms"], LOSS_ITEMS + ["main_step.grad_norms"]),
    nesterov_flipped: (["main_step.param_delta_norms"], LOSS_ITEMS + ["main_step.grad_norms"]),
    vcl_weight_one_percent_up: (["losses.loss_mcl", "losses.total"], ["losses.contrastive"]),
    kd_temperature_one_percent_up: (["losses.logit_kd"], ["losses.contrastive", "losses.classification"]),
    tau_one_percent_up: (["losses.contrastive", "losses.loss_mcl"], ["losses.logit_kd"]),
    soft_vcl_teacher_not_detached: (["main_step.grad_norms", "main_step.param_delta_norms"], LOSS_ITEMS),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS), ids=lambda m: m.__name__)
def test_checker_fails_a_mutated_main_step_on_the_right_item(mutation, monkeypatch):
    path = authors_fixture()
    mutation(monkeypatch)
    report = check(path, meta=False)
    must_fail, must_pass = MUTATIONS[mutation]
    assert set(must_fail) <= set(report.failed()), report.format()
    assert not set(must_pass) & set(report.failed()), report.format()


def test_checker_fails_a_changed_meta_learning_rate_in_float64(monkeypatch):
    """The meta lr moves the virtual steps: chaotic in float32, so the float64 items must catch it (and the float64
    losses, which the meta step does not touch, still pass). One float32 run suffices: float64 decides here."""
    path = authors_fixture()
    meta_lr_one_percent_up(monkeypatch)
    report = check(path, exact=False, variants=("default",))
    failed = set(report.failed())
    assert {"float64.meta.hypergradient (original)", "float64.meta_inner_objective_calls",
            "float64.meta_outer_objective_calls", "float64.loss_weight_network_after"} <= failed, report.format()
    assert not {i for i in failed if i.startswith("float64.losses.")}, report.format()


# ----------------------------------------------------------------------------- fixtures of the schema, ours ----
def nested(flat, key, *sizes):
    """flat['key[i][j]'] entries -> nested lists of floats of SIZES."""
    def build(prefix, sizes):
        if not sizes:
            return float(flat[prefix])
        return [build(f"{prefix}[{i}]", sizes[1:]) for i in range(sizes[0])]
    return build(key, sizes)


def write_fixture(folder, arch, seed, batch_seed, parts, float16_weights, meta):
    """A fixture of SCHEMA.md section 4 written by our own code: seeded initial modules rounded onto the fp16 grid,
    one iteration in float32 (the 'reference') and in float64 (its float64_reference), the pair's weights split into
    PARTS files. Returns its path."""
    args = get_args_parser().parse_args(["--arch", arch, "--manual_seed", str(seed)])
    torch.manual_seed(seed)
    modules, shape = build_modules(args, torch.device("cpu"))
    with torch.no_grad():
        for module in modules:
            for t in module.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half().float())
    pair, embed, aggregator, weight_net = modules
    torch.manual_seed(batch_seed)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randperm(100)[:4].repeat_interleave(2)
    stem = f"{arch}_seed{seed}"
    state = {k: v.half() if v.is_floating_point() else v for k, v in pair.state_dict().items()}
    keys = list(state)
    weight_files, sha = {}, {}
    for i in range(parts):
        name = f"{stem}_fixture_part{i}.pt"
        torch.save({k: state[k] for k in keys[i * len(keys) // parts:(i + 1) * len(keys) // parts]}, folder / name)
        weight_files[f"part{i}"], sha[f"part{i}"] = name, hashlib.sha256((folder / name).read_bytes()).hexdigest()
    cast = (lambda v: v.half() if v.is_floating_point() else v) if float16_weights else (lambda v: v)
    fixture_args = {k: getattr(args, k) for k in ("arch", "init_lr", "weight_decay", "lr_type", "milestones", "epochs",
                                                  "batch_size", "times", "meta_freq", "manual_seed", "number_net",
                                                  "kd_T", "tau", "alpha", "gamma", "beta", "lam", "feat_dim")}
    fixture_args.update(number_stage=shape.number_stage, rep_dim=shape.rep_dim, feat_dims=shape.feat_dims)
    fixture = {"description": f"{arch}, seed {seed}, batch seed {batch_seed}: written by mcl/ itself (test)",
               "args": fixture_args, "weight_files": weight_files, "weight_file_sha256": sha,
               "weights": {name: {k: cast(v) for k, v in m.state_dict().items()}
                           for name, m in (("criterion_mcl", embed), ("aggregator", aggregator),
                                           ("loss_weight_network", weight_net))},
               "input": x, "labels": y, "batch_seed": batch_seed, "guide": {"weights": "float16" if float16_weights
                                                                            else "float32"}}
    run = iteration(fixture, state, torch.float32, meta=meta)
    run64 = iteration(fixture, state, torch.float64, meta=meta, exact=meta)
    n, s = len(shape.rep_dim), shape.number_stage
    out = run["outputs"]

    def per_head(d):
        return [[d[f"{i}.{j}"] for j in range(s)] for i in range(n)]

    def loss_values(r):
        flat = r["losses"]
        return {"stage_ce": nested(flat, "stage_ce", n, s), "aggregated_ce": nested(flat, "aggregated_ce", n),
                "loss_cls": float(flat["loss_cls"]), "logit_kd_terms": nested(flat, "logit_kd_terms", n, n),
                **{k: float(flat[k]) for k in ("loss_logit_kd", "vcl", "soft_vcl", "icl", "soft_icl", "loss_mcl",
                                               "total")}}
    fixture["outputs"] = {"raw_features": per_head(out["raw_features"]), "logits": per_head(out["logits"]),
                          "aggregated_logits": [out["aggregated_logits"][str(i)] for i in range(n)],
                          "aggregator_stage_weights": [out["aggregator_stage_weights"][str(i)] for i in range(n)],
                          "lwn_weights": [out["lwn_weights"][str(c)] for c in range(len(out["lwn_weights"]))],
                          "projected_embeddings": per_head(out["projected_embeddings"]),
                          "train_top1_correct": per_head(out["train_top1_correct"])}
    fixture["losses"] = {**loss_values(run), "mcl_breakdown": [
        {k: (float(v.detach()) if torch.is_tensor(v) else v) for k, v in b.items()} for b in run["breakdown"]]}
    fixture["main_step"] = {"lr": run["lr"], "grad_norms": run["grad_norms"], "param_delta_norms": {
        **run["param_delta_norms"], **{k: 0.0 for k in run["buffer_keys"]}}}
    fixture["float64_reference"] = {"note": "our own float64 run", "losses": loss_values(run64)}
    if meta:
        m, m64 = run["meta"], run64["meta"]
        first_bn = next(k for k in m["buffers"] if k.endswith("num_batches_tracked"))
        fixture["meta_step"] = {
            "inner_objective_calls": m["inner"], "outer_objective_calls": m["outer"],
            "loss_weight_network_grads": m["hypergradient"], "loss_weight_network_after": m["weight_net_after"],
            "rollback_max_abs_diff_net_params": 0.0, "rollback_max_abs_diff_embed_heads": 0.0,
            "bn_running_mean_max_abs_change_during_meta": m["bn_running_mean_change"],
            "num_batches_tracked_after": {first_bn: int(m["buffers"][first_bn])},
            "meta_optimizer_state_entries_after": 0}
        fixture["float64_reference"].update(
            meta_inner_objective_calls=[c["loss_mcl"] for c in m64["inner"]], meta_outer_objective_calls=m64["outer"],
            loss_weight_network_grads_original_metasgd=m64["hypergradient"],
            loss_weight_network_after_original=m64["weight_net_after"],
            loss_weight_network_grads_exact_unrolled=m64["hypergradient_exact"])
    path = folder / f"{stem}_fixture.pt"
    torch.save(fixture, path)
    return path


def test_checker_reads_and_passes_a_fixture_of_another_configuration(tmp_path, monkeypatch):
    """ResNet-32 + ResNet-110 (CrossNets keys net1./net2.), seed 7, batch seed 3, the pair's weights in three files,
    float16 loss-side weights: our code passes it, a mutated variant (no weight decay) fails it."""
    path = write_fixture(tmp_path, "lmcl_res32_res110_cifar", seed=7, batch_seed=3, parts=3, float16_weights=True,
                         meta=False)
    fixture = torch.load(path, weights_only=False)
    assert fixture["weights"]["aggregator"]["proj_head_1.0.weight"].dtype == torch.float16
    assert len(fixture["weight_files"]) == 3 and "meta_step" not in fixture
    assert any(k.startswith("net2.module_list.0.") for k in fixture["main_step"]["param_delta_norms"])
    report = check(path)
    assert report.ok, report.format()
    assert len(report.items) > 20
    weight_decay_off(monkeypatch)
    assert "main_step.param_delta_norms" in check(path, variants=("default",)).failed()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["lmcl_res32_res110_cifar", "lmcl_wrn_16_2_cifar"])
def test_checker_passes_a_fixture_with_its_meta_step(tmp_path, monkeypatch, arch):
    """With the meta step and a float64 reference (two weight files): our code passes it (the meta trajectory
    through deep pairs is not comparable in float32 and is checked in float64); a changed meta learning rate fails
    the float64 hypergradient."""
    path = write_fixture(tmp_path, arch, seed=0, batch_seed=5, parts=2, float16_weights=False, meta=True)
    report = check(path)
    assert report.ok, report.format()
    assert {f"float64.meta.hypergradient ({tag})" for tag in ("original", "exact")} <= \
        {i.name for i in report.items if i.status == "ok"}
    meta_lr_one_percent_up(monkeypatch)
    assert "float64.meta.hypergradient (original)" in check(path, exact=False, variants=("default",)).failed()


def test_checker_explains_fixtures_it_cannot_check(tmp_path):
    from common.parity import FixtureError
    torch.save({"args": {"arch": "lmcl_resnet33_cifar"}, "weight_files": {}, "weights": {}, "input": None,
                "labels": None, "outputs": {}, "losses": {}}, tmp_path / "bad_fixture.pt")
    with pytest.raises(FixtureError, match="not a pair of main_layer_mcl_cifar_meta.py"):
        check(tmp_path / "bad_fixture.pt")
    torch.save({"args": {}}, tmp_path / "partial_fixture.pt")
    with pytest.raises(FixtureError, match="not an L-MCL fixture"):
        check(tmp_path / "partial_fixture.pt")

