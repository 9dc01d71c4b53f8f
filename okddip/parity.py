"""Check this implementation against the reference fixtures of the released code.

    python -m okddip.parity [FIXTURE.pt ...]    (default: every *_fixture.pt in ../shared/fixtures/okddip)

For each fixture: builds the model its `meta.constructor_call` describes, loads `state_dict_fp16` (+ parts) as
float32 and checks, printing the largest error per item:
  * the seed regeneration (`exact_weight_checksums`; then the `exact` outputs/losses with the regenerated weights),
  * train-mode outputs and intermediates, every loss term at every stored epoch (`canonical`),
  * float64 references in float64 (`float64_reference`),
  * one training step per stored run (`original_train_step`): logged metrics, gradients, state after SGD,
  * eval-mode outputs and the metrics of the released evaluate(), the detach probe.
Exit status 0 only when every item is within tolerance.
"""
import argparse
import ast
import math
import os
import pathlib
import sys

import torch

from okddip.losses import dml_loss, okddip_loss, one_loss, ramp_weight
from okddip.models import IndependentNets, OKDDipBranches, ONEBranches
from okddip.students import diversity_dist, student_logits

DEFAULT_DIR = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "okddip"
TOL = {"out": 1e-5, "loss": 1e-5, "grad": 1e-4, "f64": 1e-10, "metric": 1e-4,
       # Early-layer BatchNorm weight/bias gradients are sums of many cancelling terms: on CPU float32 the same
       # computation differs from its float64 value by up to ~4e-3 (e.g. resnet32 bn1.weight, CE only), and the
       # reference machine's rounding differs from ours. Whole-network gradient norms and the post-step state are
       # therefore compared at 1e-2, and the stored full gradient tensors (heads, query/key, ONE gate, whose
       # gradient passes through a BatchNorm1d over 8 samples) at 1e-3. A wrong loss or detach changes these by O(1).
       "grad_bn": 1e-2, "state": 1e-2, "grad_full": 1e-3,
       "gate_bn": 1e-4}  # the ONE gate's BatchNorm1d divides by the std of 8 gate logits: float32 noise x ~10
GRAD_FLOOR = 1e-3  # gradients below this l2 (e.g. a bias feeding a BatchNorm, analytically 0) compare absolutely


# --------------------------------------------------------------------------------------------- configuration ----
def parse_constructor(call):
    """'resnet_GL.resnet32(num_classes=10, ...)' -> ('resnet_GL', 'resnet32', {kwargs})."""
    node = ast.parse(call.strip(), mode="eval").body
    func = ast.unparse(node.func).split(".")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    args = [ast.literal_eval(a) for a in node.args]
    return func[-2], func[-1], kwargs, args


def configure(fx):
    module, func, kw, args = parse_constructor(fx["meta"]["constructor_call"])
    hc = fx["meta"].get("harness_config", {})
    if module in ("DML", "MultiNet"):
        arch = kw.get("model", args[0] if args else hc.get("arch", "resnet32"))
    else:
        arch = func
    cfg = {"module": module, "arch": arch, "num_classes": kw.get("num_classes", hc.get("num_classes", 10)),
           "num_branches": kw.get("num_branches", hc.get("num_branches", 4)), "kw": kw,
           "init_seed": hc.get("init_seed", 0)}
    if module.endswith("_GL"):
        cfg["method"] = "okddip"
        cfg["build"] = lambda: OKDDipBranches(arch, cfg["num_classes"], cfg["num_branches"], factor=kw.get("factor", 8),
                                              ensemble=kw.get("en", False))
    elif module.endswith("_one"):
        cfg["method"] = "one"
        cfg["build"] = lambda: ONEBranches(arch, cfg["num_classes"], cfg["num_branches"], ind=kw.get("ind", False),
                                           avg=kw.get("avg", False), bpscale=kw.get("bpscale", False))
    elif module == "DML":
        cfg["method"] = "dml"
        cfg["build"] = lambda: IndependentNets(arch, cfg["num_classes"], cfg["num_branches"],
                                               dropout=kw.get("dropout", 0.0))
    elif module == "MultiNet":
        cfg["method"] = "okddip"
        cfg["build"] = lambda: IndependentNets(arch, cfg["num_classes"], cfg["num_branches"], attention=True,
                                               factor=kw.get("factor", 8), ensemble=kw.get("en", False))
    else:
        raise ValueError(f"unknown fixture kind {module!r} (constructor {fx['meta']['constructor_call']!r})")
    hyper = fx["meta"].get("hyper", {})
    cfg.update(T=float(hyper.get("T", 3.0)), alpha=float(hyper.get("alpha", 1.0)),
               start=float(hyper.get("start_consistency", 0.0)), length=float(hyper.get("length", 80)),
               num_epochs=int(hyper.get("num_epochs", 300)), loss=hyper.get("loss", "KL"))
    return cfg


def fixture_weights(fx, path):
    sd = dict(fx["state_dict_fp16"])
    for part in fx.get("state_dict_fp16_parts", []) or []:
        sd.update(torch.load(os.path.join(os.path.dirname(path), part), map_location="cpu", weights_only=False))
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------- compute ----
def losses(cfg, out, y, epoch, ind=False):
    w = ramp_weight(epoch, cfg["num_epochs"], cfg["start"], cfg["length"])
    if cfg["method"] == "okddip":
        return okddip_loss(out, y, w, cfg["alpha"], cfg["T"], cfg["loss"])
    if cfg["method"] == "one":
        if ind:
            out = dict(out, x_m=None)
        return one_loss(out, y, w, cfg["alpha"], cfg["T"], cfg["loss"])
    return dml_loss(out, y, cfg["T"])


def flat_terms(cfg, terms, pairwise_total=None):
    """Our loss terms under the fixture's key names."""
    v = lambda t: [float(torch.as_tensor(x).detach()) for x in t] if isinstance(t, list) else float(torch.as_tensor(t).detach())
    if cfg["method"] == "okddip":
        r = {"consistency_weight": v(terms["consistency_weight"]), "ce_peer": v(terms["ce_peer"]),
             "kl_peer_T2": v(terms["kl_peer_T2"]),
             "logged_train_true_loss (sum ce_peer, leader CE excluded)": v(terms["logged_train_true_loss"]),
             "logged_train_group_loss (sum kl_peer, leader KL excluded)": v(terms["logged_train_group_loss"]),
             "total_loss": v(terms["total_loss"])}
        if "ce_leader" in terms:
            r.update(ce_leader=v(terms["ce_leader"]), kl_leader_T2=v(terms["kl_leader_T2"]))
        return r
    if cfg["method"] == "one":
        r = {"consistency_weight": v(terms["consistency_weight"]), "ce_branch": v(terms["ce_branch"]),
             "logged_train_true_loss": v(terms["logged_train_true_loss"]),
             "logged_train_group_loss": v(terms["logged_train_group_loss"]), "total_loss": v(terms["total_loss"])}
        if "ce_gated_ensemble" in terms:
            r["ce_gated_ensemble"] = v(terms["ce_gated_ensemble"])
            r["logged_train_true_loss (sum ce_branch + ce_gated_ensemble)"] = r["logged_train_true_loss"]
            r["kl_branch_T2 (target = gated ensemble logits)"] = v(terms["kl_branch_T2"])
        elif "kl_branch_T2" in terms:
            r["kl_branch_T2 (target = mean of the other branches' logits)"] = v(terms["kl_branch_T2"])
        return r
    return {"ce": v(terms["ce"]), "kl_T2_to_mean_of_other_logits (default, --type absent)": v(terms["kl_T2"]),
            "total_loss_default": v(terms["total_loss"])}


OUT_KEYS = {"x_stu": "leader", "out": "pro", "leader logits": "leader"}


def authors_metrics(cfg, out, y, prefix):
    """The accuracy part of the released train()/evaluate() dicts for one batch (percent)."""
    logits, individuals = student_logits(cfg["method"], out)
    acc = lambda z, k: 100.0 * float((z.topk(k, 1).indices == y[:, None]).any(1).float().mean())
    r = {}
    top1 = [acc(logits[n], 1) for n in individuals]
    top5 = [acc(logits[n], 5) for n in individuals]
    r[f"mean_{prefix}_accTop1"] = sum(top1) / len(top1)
    # the released train loops store the top-1 mean under mean_train_accTop5 too
    r[f"mean_{prefix}_accTop5"] = r[f"mean_{prefix}_accTop1"] if prefix == "train" else sum(top5) / len(top5)
    r[f"{prefix}_accTop1"], r[f"{prefix}_accTop5"] = acc(logits["ensemble"], 1), acc(logits["ensemble"], 5)
    if "leader" in logits:
        r[f"stu_{prefix}_accTop1"], r[f"stu_{prefix}_accTop5"] = acc(logits["leader"], 1), acc(logits["leader"], 5)
    for i, n in enumerate(individuals):
        r[f"stu{i}{prefix}_accTop1"], r[f"stu{i}{prefix}_accTop5"] = top1[i], top5[i]
    return r, logits, individuals


# --------------------------------------------------------------------------------------------------- compare ----
class Report:
    def __init__(self, name):
        self.name, self.items, self.failed = name, [], False

    def add(self, item, err, tol, note=""):
        ok = err <= tol
        self.failed |= not ok
        self.items.append((item, err, tol, ok, note))

    def rel(self, item, ours, ref, tol, atol_scale=None):
        """Largest |ours - ref| / max(|ref|, floor) over all values (floor = 1, or atol_scale)."""
        ours = torch.as_tensor(ours, dtype=torch.float64)
        ref = torch.as_tensor(ref, dtype=torch.float64)
        if ours.shape != ref.shape:
            self.add(item, math.inf, tol, f"shape {tuple(ours.shape)} vs {tuple(ref.shape)}")
            return
        floor = 1.0 if atol_scale is None else atol_scale
        err = ((ours - ref).abs() / ref.abs().clamp_min(floor)).max().item() if ours.numel() else 0.0
        self.add(item, err, tol)

    def print(self):
        print(f"== {self.name}")
        for item, err, tol, ok, note in self.items:
            print(f"  {'ok  ' if ok else 'FAIL'} {item:<60s} max err {err:.3e} (tol {tol:.0e}){' ' + note if note else ''}")
        print(f"  -> {'FAIL' if self.failed else 'all match'} ({len(self.items)} items)")


def compare_forward(rep, label, cfg, model, ref, x, y, tol_out, tol_loss, epochs_key="loss_terms_by_epoch"):
    out = model(x)
    for key, value in ref.items():
        if isinstance(value, torch.Tensor):
            ours = out.get(OUT_KEYS.get(key, key))
            if ours is None:
                rep.add(f"{label}.{key}", math.inf, tol_out, "not produced")
                continue
            tol = TOL["gate_bn"] if key == "gate_bn_output_prerelu" and tol_out == TOL["out"] else tol_out
            rep.rel(f"{label}.{key}", ours.detach(), value, tol)
    if epochs_key in ref:
        for epoch, terms in ref[epochs_key].items():
            _, ours = losses(cfg, out, y, epoch)
            ours = flat_terms(cfg, ours)
            for name, value in terms.items():
                if name not in ours:
                    rep.add(f"{label}.loss[{epoch}].{name}", math.inf, tol_loss, "term not computed")
                    continue
                rep.rel(f"{label}.loss[{epoch}].{name}", ours[name], value, tol_loss)
    if "loss_terms" in ref:  # DML
        total, terms = dml_loss(out, y, cfg["T"])
        ours = flat_terms(cfg, terms)
        t = ref["loss_terms"]
        for name in ours:
            rep.rel(f"{label}.loss.{name}", ours[name], t[name], tol_loss)
        pair_key = "kl_T2_pairwise[j][k] (used with --type)"
        if pair_key in t:
            from okddip.losses import kl_t
            pro, m = out["pro"], out["pro"].size(-1)
            mine = [[0.0 if j == k else float(kl_t(pro[:, :, j], pro[:, :, k], cfg["T"]).detach()) for k in range(m)]
                    for j in range(m)]
            refm = [[0.0 if v is None else v for v in row] for row in t[pair_key]]
            rep.rel(f"{label}.loss.{pair_key}", mine, refm, tol_loss)
        if "total_loss_with_--type" in t:
            rep.rel(f"{label}.loss.total_loss_with_--type", float(dml_loss(out, y, cfg["T"], pairwise=True)[0]),
                    t["total_loss_with_--type"], tol_loss)
    return out


def check_train_step(rep, label, cfg, weights, x, y, run, epoch, ind=False):
    torch.manual_seed(0)
    model = cfg["build"]()
    if ind:
        model.ind = True
    model.load_state_dict(weights)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    out = model(x)
    loss, terms = losses(cfg, out, y, epoch, ind=ind)
    metrics, _, _ = authors_metrics(cfg, out, y, "train")
    metrics.update(train_loss=float(loss), train_true_loss=float(terms["logged_train_true_loss"]),
                   train_group_loss=float(terms["logged_train_group_loss"]))
    for k, v in run["train_metrics_from_original_train()"].items():
        if k == "time":
            continue
        if k not in metrics:
            rep.add(f"{label}.metric.{k}", math.inf, TOL["metric"], "not computed")
            continue
        rep.rel(f"{label}.metric.{k}", metrics[k], v, TOL["loss"] if "loss" in k else TOL["metric"])
    opt.zero_grad()
    loss.backward()
    params = dict(model.named_parameters())
    worst_l2 = worst_sum = worst_full = 0.0
    missing = []
    for name, g in run["grads_of_total_loss"].items():
        p = params.get(name)
        if p is None:
            missing.append(name)
            continue
        if g is None or p.grad is None:
            if (g is None) != (p.grad is None):
                missing.append(f"{name} (grad None mismatch)")
            continue
        gd = p.grad.double()
        worst_l2 = max(worst_l2, abs(gd.norm().item() - g["l2"]) / max(g["l2"], GRAD_FLOOR))
        worst_sum = max(worst_sum, abs(gd.sum().item() - g["sum"]) / max(g["l2"] * math.sqrt(gd.numel()),
                                                                          GRAD_FLOOR))
        if "full" in g:
            worst_full = max(worst_full, ((gd - g["full"].double()).abs().max() / g["full"].abs().max()
                                          .clamp_min(GRAD_FLOOR)).item())
    rep.add(f"{label}.grads, every tensor (l2, rel)", worst_l2, TOL["grad_bn"],
            f"{len(missing)} unmatched" if missing else "")
    rep.add(f"{label}.grads, every tensor (sum, rel. to l2*sqrt(n))", worst_sum, TOL["grad_bn"])
    rep.add(f"{label}.grads, stored full tensors (rel. to max)", worst_full, TOL["grad_full"])
    if missing:
        rep.add(f"{label}.grads present", math.inf, 0, ", ".join(missing[:3]))
    opt.step()
    state = model.state_dict()
    key = next(k for k in run if k.startswith("state_after_one_sgd_step"))
    worst = 0.0
    for name, s in run[key].items():
        t = state[name].double()
        worst = max(worst, abs(t.norm().item() - s["l2"]) / max(s["l2"], 1e-12),
                    abs(t.sum().item() - s["sum"]) / max(s["l2"] * math.sqrt(t.numel()), 1e-12))
    rep.add(f"{label}.state after SGD step (sum, l2)", worst, TOL["state"])


def checksums_match(model, ref):
    sd = model.state_dict()
    worst = 0.0
    for name, c in ref.items():
        if name not in sd:
            return math.inf
        t = sd[name].double()
        flat = t.reshape(-1)
        vals = [(t.sum().item(), c["sum"]), (t.abs().sum().item(), c["abs_sum"]), (t.pow(2).sum().item(), c["sq_sum"])]
        vals += list(zip(flat[:4].tolist(), c["first4"]))
        scale = max(1.0, abs(c["abs_sum"]))
        worst = max(worst, max(abs(a - b) for a, b in vals) / scale)
    return worst


def check_fixture(path):
    fx = torch.load(path, map_location="cpu", weights_only=False)
    cfg = configure(fx)
    rep = Report(f"{os.path.basename(path)}: {cfg['module']}.{cfg['arch']} C={cfg['num_classes']} "
                 f"m={cfg['num_branches']} ({cfg['method']})")
    x, y = fx["input"], fx["labels"]
    weights = fixture_weights(fx, path)
    model = cfg["build"]()
    missing = set(model.state_dict()) ^ set(weights)
    rep.add("state_dict keys", float(len(missing)), 0, f"differ: {sorted(missing)[:3]}" if missing else "")
    if missing:
        return rep
    model.load_state_dict(weights)
    model.train()
    compare_forward(rep, "canonical", cfg, model, fx["canonical"], x, y, TOL["out"], TOL["loss"])
    ind_key = next((k for k in fx["canonical"] if k.startswith("ind_mode_loss_terms")), None)
    if ind_key:
        out = model(x)
        _, terms = losses(cfg, out, y, 100, ind=True)
        ours = flat_terms(cfg, terms)
        for name, value in fx["canonical"][ind_key].items():
            if name == "consistency_weight":
                continue
            rep.rel(f"canonical.ind.{name}", ours[name], value, TOL["loss"])

    # seed regeneration, then the `exact` section with the regenerated weights
    if "exact_weight_checksums" in fx:
        torch.manual_seed(cfg["init_seed"])
        exact_model = cfg["build"]()
        err = checksums_match(exact_model, fx["exact_weight_checksums"])
        rep.add(f"seed-{cfg['init_seed']} weights regenerated (checksums)", err, 1e-6)
        if "exact" in fx and err <= 1e-6:
            exact_model.train()
            compare_forward(rep, "exact", cfg, exact_model, fx["exact"], x, y, TOL["out"], TOL["loss"])

    if "float64_reference" in fx:
        m64 = cfg["build"]().double()
        m64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in weights.items()})
        m64.train()
        ref = {k: v for k, v in fx["float64_reference"].items() if k != "note"}
        compare_forward(rep, "float64", cfg, m64, ref, x.double(), y, TOL["f64"], TOL["f64"])

    runs = fx.get("original_train_step", {})
    if "train_metrics_from_original_train()" in runs:  # DML: a single run
        runs = {0: runs}
    for key, run in runs.items():
        epoch = 0 if key == "ind_epoch0" else key
        check_train_step(rep, f"train_step[{key}]", cfg, weights, x, y, run, epoch, ind=(key == "ind_epoch0"))

    if "detach_probe" in fx:
        torch.manual_seed(0)
        m = cfg["build"]()
        m.load_state_dict(weights)
        out = m(x)
        out["x_m"] = out["x_m"].detach()
        losses(cfg, out, y, 100)[0].backward()
        for name, expected in fx["detach_probe"].items():
            rep.add(f"detach_probe: {name}", float((m.query_weight.weight.grad is None) != expected), 0)

    if "eval_mode_canonical" in fx:
        model.load_state_dict(weights)
        model.eval()
        with torch.no_grad():
            ref = fx["eval_mode_canonical"]
            out = compare_forward(rep, "eval", cfg, model, {k: v for k, v in ref.items() if
                                                            isinstance(v, torch.Tensor)}, x, y, TOL["out"], TOL["loss"])
            mref = next((v for k, v in ref.items() if k.startswith("metrics")), None)
            if mref:
                ours, logits, individuals = authors_metrics(cfg, out, y, "test")
                _, terms = losses(cfg, out, y, 100)
                ours["test_true_loss"] = float(terms["logged_train_true_loss"])
                ours["test_group_loss"] = float(terms["logged_train_group_loss"])
                dist_sum, n = diversity_dist([logits[k] for k in individuals])
                ours["dist"] = float(dist_sum) / n
                for k, v in mref.items():
                    if k in ("time", "test_loss"):
                        continue  # test_loss depends on the ramp weight of the epoch evaluate() ran at
                    if k in ours:
                        rep.rel(f"eval.metric.{k}", ours[k], v, TOL["metric"])
                    else:
                        rep.add(f"eval.metric.{k}", math.inf, TOL["metric"], "not computed")
    return rep


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixtures", nargs="*", help="fixture files (default: every *_fixture.pt in the shared folder)")
    args = parser.parse_args(argv)
    paths = args.fixtures or sorted(str(p) for p in DEFAULT_DIR.glob("*_fixture.pt"))
    if not paths:
        print(f"no fixtures given and none found in {DEFAULT_DIR}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    failed = 0
    for path in paths:
        try:
            rep = check_fixture(path)
        except Exception as e:  # a fixture we cannot read is a failure, reported with its reason
            print(f"== {os.path.basename(path)}\n  FAIL could not be checked: {type(e).__name__}: {e}")
            failed += 1
            continue
        rep.print()
        failed += rep.failed
    print(f"{len(paths) - failed}/{len(paths)} fixtures match")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
