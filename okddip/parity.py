"""Check this implementation against fixtures computed by the released code (../shared/fixtures/SCHEMA.md, OKDDip).

    python -m okddip.parity [FIXTURE.pt ...] [--fixtures-root DIR]   (default: every okddip/*_fixture.pt there)

A fixture's `meta.constructor_call` names the released model (resnet_GL / vgg_GL / densenet_GL, MultiNet.StuNet,
resnet_one / vgg_one / densenet_one, DML.MutualNet; any architecture, branch count, class count) and so the training
script and flags that build it here (train_GL.py [--MulStu], train_one.py [--ind --avg --bpscale], train_DML.py).
Every value is computed through that script: its `build()` gives the `Method` (the model, the forward of a batch
and the loss at an epoch's ramp weight), and the engine's `RecipeRun` that trains it gives the training step (its
optimizer, the epoch's lr, the step) and the logged metrics (`train_record`, `evaluate`). Each value is computed
twice, in float32 from the fixture's fp16-grid weights (`state_dict_fp16` + `state_dict_fp16_parts`) as the
reference was, and in float64 from the same weights and input, and common.parity decides (tolerance from the
measured float32-vs-float64 spread of our own code):

  layout              our state-dict keys and shapes against the fixture's weights (their order: the fingerprint
                      tests)
  seed-<s> weights    a seeded construction regenerates `exact_weight_checksums` (the released RNG order)
  canonical.*         train-mode outputs and intermediates; every loss term at every stored epoch (ramp weights in
                      float64); ONE's --ind terms
  exact.*             the same with the regenerated (un-rounded) weights
  float64.*           `float64_reference`, where present, against our float64 pass (common.parity.F64)
  train_step[e].*     one step of the script (lr of epoch e, Nesterov SGD, weight decay): logged losses and
                      accuracies, which gradients exist, every gradient (l2, sum) and the stored full gradients, the
                      state after the step (sum, l2)
  detach_probe        with x_m detached, query_weight gets no gradient
  eval.*              eval-mode outputs and the released evaluate() metrics

Analytically zero quantities (a bias feeding a BatchNorm: its gradient, and its value after a step) are compared
relative to their layer: the scale of every parameter tensor (and of its gradient) is at least the largest rms of
its module's parameters (or gradients) in float64.
"""
import ast
import copy
import dataclasses
import pathlib
import re
import sys

import torch

from common.fast import Fast
from common.meters import Meter
from common.options import detached_setup
from common.parity import (F64, FixtureError, Report, as_dtype, checker_main, checksum_vectors, load_fixture,
                           load_weight_files)
from okddip import engine, train, train_DML, train_GL, train_one
from okddip.losses import kl_t, okddip_loss
from okddip.models import check_arch
from okddip.students import INDIVIDUAL_NAMES

PLAIN, BRANCH_GL, BRANCH_ONE = ("resnet", "vgg", "densenet"), ("resnet_GL", "vgg_GL", "densenet_GL"), \
    ("resnet_one", "vgg_one", "densenet_one")
METHOD = {train: None, train_GL: "okddip", train_one: "one", train_DML: "dml"}


# --------------------------------------------------------------------------------------------- configuration ----
def parse_call(call):
    """'resnet_GL.resnet32(num_classes=10, ...)' (optionally prefixed by 'models.model_cifar.', followed by a
    bracketed comment) -> (module, function, {kwargs}, [args])."""
    call = re.sub(r"^models\.model_cifar\.", "", call.strip().split("  [")[0].strip())
    try:
        node = ast.parse(call, mode="eval").body
        module, func = ast.unparse(node.func).split(".")[-2:]
        return module, func, {k.arg: ast.literal_eval(k.value) for k in node.keywords}, \
            [ast.literal_eval(a) for a in node.args]
    except (SyntaxError, ValueError) as e:
        raise FixtureError(f"constructor call {call!r} cannot be parsed: {e}") from e


def configuration(call, harness=None):
    """The training script and its flags that build the released model CALL: (script, argv, num_classes)."""
    module, func, kw, args = parse_call(call)
    harness = harness or {}
    arch = kw.get("model", args[0] if args else harness.get("arch")) if module in ("DML", "MultiNet") else func
    try:
        check_arch(arch)
    except ValueError as e:
        raise FixtureError(f"{call}: a configuration the scripts do not support ({e})") from e
    classes = kw.get("num_classes", harness.get("num_classes", 10))
    branches = ["--num_branches", str(kw.get("num_branches", harness.get("num_branches", 4)))]
    if kw.get("factor", 8) != 8:
        raise FixtureError(f"{call}: factor {kw['factor']} (the scripts use the released 8)")
    ensemble = ["--ensemble"] if kw.get("en") else []
    if module in ("DML", "MultiNet", *PLAIN):  # plain networks: their classifier dropout is --dropout
        dropout = ["--dropout", str(kw["dropout"])] if kw.get("dropout") else []
        if module in PLAIN:
            return train, ["--model", func] + dropout, classes
        if module == "DML":
            return train_DML, ["--model", arch] + branches + dropout, classes
        return train_GL, ["--model", arch, "--MulStu"] + branches + ensemble + dropout, classes
    if module in BRANCH_GL:
        dropout = ["--branch_dropout", str(kw["dropout"])] if "dropout" in kw else []
        return train_GL, ["--model", func] + branches + ensemble + dropout, classes
    if module in BRANCH_ONE:
        flags = [f"--{k}" for k in ("ind", "avg", "bpscale") if kw.get(k)]
        # the fixtures' torch (>= 1.2) leaves the gate's BatchNorm1d weight at 1
        return train_one, ["--model", func, "--gate_bn_init", "ones"] + branches + flags, classes
    raise FixtureError(f"unknown kind of model {module!r} in {call!r}")


def script_args(script, argv, hyper=None, **extra):
    """The script's own parsed arguments for ARGV plus the fixture's hyper-parameters."""
    hyper, argv = hyper or {}, list(argv) + ["--device", "cpu"]
    for key, flag in (("T", "--temperature"), ("alpha", "--alpha"), ("start_consistency", "--start_consistency"),
                      ("length", "--length"), ("num_epochs", "--num_epochs"), ("loss", "--loss")):
        if key in hyper and (script is not train_DML or key in ("T", "loss")):
            argv += [flag, str(hyper[key])]
    for flag, on in extra.items():
        if on:
            argv.append(f"--{flag}")
    return script.get_args_parser().parse_args(argv)


class Setup:
    """One fixture's configuration: the script, its arguments, the fp16-grid weights in float32 and float64."""

    def __init__(self, fx, folder, name):
        meta = fx.get("meta", {})
        if "constructor_call" not in meta or "state_dict_fp16" not in fx:
            raise FixtureError(f"{name}: no meta.constructor_call / state_dict_fp16 (see SCHEMA.md)")
        self.harness = meta.get("harness_config", {})
        self.script, self.argv, self.num_classes = configuration(meta["constructor_call"], self.harness)
        self.hyper = meta.get("hyper", {})
        self.args = script_args(self.script, self.argv, self.hyper)
        self.method = METHOD[self.script]
        weights = dict(fx["state_dict_fp16"])
        weights.update(load_weight_files(folder, fx.get("state_dict_fp16_parts") or []))
        self.weights = {torch.float32: as_dtype(weights, torch.float32), torch.float64: as_dtype(weights, torch.float64)}
        self.x = {torch.float32: fx["input"].float(), torch.float64: fx["input"].double()}
        self.y = fx["labels"]
        self.title = f"{name}: {meta['constructor_call']} ({self.script.__name__.split('.')[-1]})"

    def build(self, args=None, dtype=torch.float32, weights=None):
        """The script's Method, its model in DTYPE holding the fixture's weights (or WEIGHTS)."""
        method = self.script.build(args or self.args, self.num_classes)
        method.model.to(dtype).load_state_dict(as_dtype(weights, dtype) if weights is not None else
                                               self.weights[dtype])
        return method

    def pair(self, args=None, weights=None):
        """{dtype: Method} for float32 and float64, the same weights."""
        single = self.build(args, torch.float32, weights)
        double = copy.deepcopy(single.model).double()
        double.load_state_dict(as_dtype(weights, torch.float64) if weights is not None else self.weights[torch.float64])
        return {torch.float32: single, torch.float64: dataclasses.replace(single, model=double)}


def recipe_run(args, method, test_loader=None):
    """The script's RecipeRun for METHOD on the CPU, outside a training run."""
    return engine.RecipeRun(detached_setup(Fast()), args, method, test_loader)


# ------------------------------------------------------------------------------------------------ our values ----
OUTPUT_NAMES = {"x_stu": "leader", "out": "pro", "leader logits": "leader"}
FULL_RAMP_EPOCH = 100  # w = 1: the stored --ind loss terms
EVAL_EPOCH = 0  # the ramp weight the stored evaluate() ran with (its test_loss matches w(0) = exp(-5))


def forward_and_losses(pair, x, y, epochs):
    """{dtype: (train-mode outputs, {epoch: loss terms})}: one forward, then the script's loss at each epoch on
    those outputs (with the epoch's ramp weight)."""
    result = {}
    for dtype, method in pair.items():
        method.model.train()
        out = method.forward(method.model, x[dtype])
        result[dtype] = (out, {epoch: method.loss(out, y, epoch)[1] for epoch in epochs})
    return result


class Recorder(torch.nn.Module):
    """MODEL, keeping the outputs of its last forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.out = model, None

    def forward(self, x):
        self.out = self.model(x)
        return self.out


def fixture_terms(setup, terms, out):
    """Our loss terms under the fixture's names (python floats / lists of floats)."""
    v = lambda t: [scalar(e) for e in t] if isinstance(t, list) else scalar(t)
    if setup.method == "okddip":
        named = {"ce_peer": v(terms["ce_peer"]), "kl_peer_T2": v(terms["kl_peer_T2"]),
                 "logged_train_true_loss (sum ce_peer, leader CE excluded)": v(terms["logged_train_true_loss"]),
                 "logged_train_group_loss (sum kl_peer, leader KL excluded)": v(terms["logged_train_group_loss"]),
                 "total_loss": v(terms["total_loss"])}
        if "ce_leader" in terms:
            named.update(ce_leader=v(terms["ce_leader"]), kl_leader_T2=v(terms["kl_leader_T2"]))
        return named
    if setup.method == "one":
        named = {"ce_branch": v(terms["ce_branch"]), "logged_train_true_loss": v(terms["logged_train_true_loss"]),
                 "logged_train_group_loss": v(terms["logged_train_group_loss"]), "total_loss": v(terms["total_loss"])}
        if "ce_gated_ensemble" in terms:
            named["ce_gated_ensemble"] = v(terms["ce_gated_ensemble"])
            named["logged_train_true_loss (sum ce_branch + ce_gated_ensemble)"] = named["logged_train_true_loss"]
            named["kl_branch_T2 (target = gated ensemble logits)"] = v(terms["kl_branch_T2"])
        elif "kl_branch_T2" in terms:
            named["kl_branch_T2 (target = mean of the other branches' logits)"] = v(terms["kl_branch_T2"])
        return named
    pro, m, T = out["pro"], out["pro"].size(-1), setup.args.temperature
    pairwise = [[None if j == k else scalar(kl_t(pro[:, :, j], pro[:, :, k], T)) for k in range(m)] for j in range(m)]
    return {"ce": v(terms["ce"]), "kl_T2_to_mean_of_other_logits (default, --type absent)": v(terms["kl_T2"]),
            "total_loss_default": v(terms["total_loss"]), "kl_T2_pairwise[j][k] (used with --type)": pairwise}


def scalar(t):
    """A loss term as a python float (float64: no float32 round trip)."""
    return t.detach().item() if torch.is_tensor(t) else float(t)


def without_none(value):
    """A stored loss value without its None entries (the pairwise matrix's diagonal)."""
    if isinstance(value, list):
        return [without_none(v) for v in value if v is not None]
    return value


# --------------------------------------------------------------------------------------------------- checks ----
def check_forward(report, label, setup, pair, ref):
    """REF's tensors and loss terms against ours: the float32 rule, or float64 tolerances when PAIR holds only the
    float64 side (float64_reference)."""
    by_epoch = "loss_terms_by_epoch" in ref
    tables = ref["loss_terms_by_epoch"] if by_epoch else ({0: ref["loss_terms"]} if "loss_terms" in ref else {})
    ours = forward_and_losses(pair, setup.x, setup.y, list(tables) or [0])
    out32 = ours[torch.float32][0] if torch.float32 in ours else None
    out64 = ours[torch.float64][0]
    for key, value in ref.items():
        if not torch.is_tensor(value):
            continue
        name = OUTPUT_NAMES.get(key, key)
        if name not in out64:
            report.exact(f"{label}.{key}", False, "not produced by our model")
        elif out32 is None:
            report.float64(f"{label}.{key}", out64[name], value, F64["output"])
        else:
            report.float32(f"{label}.{key}", out32[name].detach(), value, out64[name].detach())
    for epoch, stored in tables.items():
        named = {d: fixture_terms(setup, terms[epoch], out) for d, (out, terms) in ours.items()}
        if "total_loss_with_--type" in stored:  # DML: the same outputs under train_DML.py --type
            pairwise = setup.script.build(script_args(setup.script, setup.argv, setup.hyper, type=True),
                                          setup.num_classes).loss
            for d, (out, _) in ours.items():
                named[d]["total_loss_with_--type"] = scalar(pairwise(out, setup.y, epoch)[0])
        suffix = f"[{epoch}]" if by_epoch else ""
        if "consistency_weight" in stored:  # a python float, in float64 as released
            report.float64(f"{label}.loss{suffix}.consistency_weight", ours[torch.float64][1][epoch]
                           ["consistency_weight"], stored["consistency_weight"], F64["loss"])
        rows = {k: without_none(v) for k, v in stored.items() if k != "consistency_weight"}
        missing = [k for k in rows if k not in named[torch.float64]]
        if missing:
            report.exact(f"{label}.loss{suffix}", False, f"terms not computed: {missing}")
        elif out32 is None:
            for k, v in rows.items():
                report.float64(f"{label}.loss{suffix}.{k}", without_none(named[torch.float64][k]), v, F64["loss"])
        else:
            report.entries(f"{label}.loss{suffix}", {k: (without_none(named[torch.float32][k]), v,
                                                         without_none(named[torch.float64][k]))
                                                     for k, v in rows.items()}, shared_spread=True)


def layer_floors(tensors):
    """{module prefix: largest rms (float64) of the module's tensors}: the scale below which a tensor of the layer
    is compared in absolute terms."""
    floors = {}
    for name, t in tensors.items():
        if t is not None and t.is_floating_point() and t.numel():
            prefix = name.rpartition(".")[0]
            floors[prefix] = max(floors.get(prefix, 0.0), float(t.double().pow(2).mean().sqrt()))
    return floors


def layer_checksums(report, name, ours32, refs, ours64, floors):
    """Stored checksums against our tensors, each tensor's scale at least its layer's floor."""
    rows = {}
    for key, ref in refs.items():
        if key not in ours32 or key not in ours64:
            report.exact(name, False, f"{key}: not produced by our model")
            return
        vectors = checksum_vectors(ours32[key], ours64[key], ref, floors.get(key.rpartition(".")[0], 0.0))
        if vectors is None:
            report.exact(name, False, f"{key}: fewer values than the stored checksum")
            return
        rows[key] = (vectors[0], vectors[2], vectors[1])
    report.entries(name, rows, scale=1.0)


def layer_tensors(report, name, ours32, refs, ours64, floors):
    """Stored full tensors against ours, each divided by max(its largest |float64| value, its layer's floor)."""
    rows = {}
    for key, ref in refs.items():
        scale = max(float(ours64[key].abs().max()), floors.get(key.rpartition(".")[0], 0.0), 1e-300)
        rows[key] = (ours32[key] / scale, ref.double() / scale, ours64[key] / scale)
    report.entries(name, rows, scale=1.0)


def record_key(name, method, prefix):
    """A released metric name (train_loss, mean_train_accTop1, stu2train_accTop5, dist, ...) -> our log key."""
    student = INDIVIDUAL_NAMES.get(method, "net")
    p = prefix
    patterns = [(rf"^{p}_loss$", "loss"), (rf"^{p}_true_loss$", "true_loss"), (rf"^{p}_group_loss$", "group_loss"),
                (rf"^{p}_teacher_loss$", "teacher_loss"), (rf"^mean_{p}_accTop(\d)$", r"mean/top\1"),
                (rf"^{p}_accTop(\d)$", r"ensemble/top\1"), (rf"^stu_{p}_accTop(\d)$", r"leader/top\1"),
                (rf"^stu(\d+){p}_accTop(\d)$", student + r"\1/top\2"), (r"^dist$", "dist")]
    for pattern, replacement in patterns:
        if re.match(pattern, name):
            key = re.sub(pattern, replacement, name)
            if prefix == "train" and key == "mean/top5":
                key = "mean/top1"  # the released train loops store the top-1 mean under mean_train_accTop5
            return f"{prefix}/{key}"
    return None


def check_metrics(report, label, setup, stored, ours, prefix, skip=("time",)):
    """Logged metrics: losses (one shared spread), accuracies (percent, scale 100), others one by one."""
    losses, accuracies = {}, {}
    for name, value in stored.items():
        if name in skip:
            continue
        key = record_key(name, setup.method, prefix)
        if key is None or key not in ours[torch.float64]:
            report.exact(f"{label}.{name}", False, f"not logged by our script ({key})")
            continue
        row = (ours[torch.float32][key], value, ours[torch.float64][key])
        if "/top" in key:
            accuracies[name] = row
        elif key.endswith("loss"):
            losses[name] = row
        else:
            report.float32(f"{label}.{name}", *row)
    if losses:
        report.entries(f"{label}.logged losses", losses, shared_spread=True)
    if accuracies:
        report.entries(f"{label}.logged accuracies", accuracies, scale=100.0)


def train_step(setup, args, epoch):
    """One training step through the script's own code (its Method in a RecipeRun: the optimizer, the epoch's lr,
    the step, the epoch record) in float32 and float64: {dtype: logged record}, {dtype: {parameter: gradient or
    None}}, {dtype: state after the step}."""
    grads, states, records = {}, {}, {}
    for dtype, method in setup.pair(args).items():
        run = recipe_run(args, method)
        run.on_epoch_start(epoch)
        meter = Meter()
        meter.update(run.train_step(0, setup.x[dtype], setup.y), setup.y.size(0))
        records[dtype] = run.train_record(meter)
        model = method.model
        grads[dtype] = {n: None if p.grad is None else p.grad.detach() for n, p in model.named_parameters()}
        states[dtype] = {n: t.detach() for n, t in model.state_dict().items()}
    return records, grads, states


def check_train_step(report, label, setup, run, epoch, args):
    """One stored run of the released train() against the same step of ours (ramp weight in float64)."""
    if "consistency_weight" in run:
        ramp = setup.script.build(args, setup.num_classes).ramp
        report.float64(f"{label}.consistency_weight", ramp(epoch), run["consistency_weight"], F64["loss"])
    records, grads, states = train_step(setup, args, epoch)
    check_metrics(report, f"{label}.metric", setup, run["train_metrics_from_original_train()"], records, "train")
    stored = run["grads_of_total_loss"]
    ours = [k for k, g in grads[torch.float64].items() if g is not None]
    report.equal(f"{label}.gradients present", sorted(k for k in ours if k in stored) +
                 sorted(f"{k} (unknown to the fixture)" for k in stored if k not in grads[torch.float64]),
                 sorted(k for k, g in stored.items() if g is not None))
    with_grad = {k: g for k, g in stored.items() if g is not None and k in ours}
    floors = layer_floors(grads[torch.float64])
    layer_checksums(report, f"{label}.grads (l2, sum)", grads[torch.float32], with_grad, grads[torch.float64], floors)
    full = {k: g["full"] for k, g in with_grad.items() if "full" in g}
    if full:
        layer_tensors(report, f"{label}.grads, stored full tensors", grads[torch.float32], full,
                      grads[torch.float64], floors)
    state_key = next(k for k in run if k.startswith("state_after_one_sgd_step"))
    floors = layer_floors({k: t for k, t in states[torch.float64].items() if k in grads[torch.float64]})
    layer_checksums(report, f"{label}.state after the step (sum, l2)", states[torch.float32], run[state_key],
                    states[torch.float64], floors)


def check_eval(report, setup, ref):
    """Eval-mode outputs of the fresh model and the metrics of the script's evaluate() on the one batch."""
    tensors = {k: v for k, v in ref.items() if torch.is_tensor(v)}
    outs, records = {}, {}
    for dtype, method in setup.pair().items():
        recorder = Recorder(method.model)
        run = recipe_run(setup.args, dataclasses.replace(method, model=recorder), [(setup.x[dtype], setup.y)])
        records[dtype] = run.evaluate(EVAL_EPOCH)
        outs[dtype] = recorder.out
    for key, value in tensors.items():
        name = OUTPUT_NAMES.get(key, key)
        report.float32(f"eval.{key}", outs[torch.float32][name], value, outs[torch.float64][name])
    stored = next((v for k, v in ref.items() if k.startswith("metrics")), None)
    if stored:
        check_metrics(report, "eval.metric", setup, stored, records, "test")


def check_detach_probe(report, setup, probe):
    """With the attention targets x_m detached, the query projection gets no gradient (it learns only through the
    targets, as released)."""
    model = setup.build().model
    model.train()
    out = model(setup.x[torch.float32])
    out["x_m"] = out["x_m"].detach()
    okddip_loss(out, setup.y, 1.0, setup.args.alpha, setup.args.temperature, setup.args.loss)[0].backward()
    for name, expected in probe.items():
        report.equal(f"detach_probe: {name}", model.query_weight.weight.grad is None, expected)


def check_fixture(path, cli_args=None):
    """Every item of the fixture file PATH (its weight parts beside it)."""
    path = pathlib.Path(path)
    return check(load_fixture(path), path.parent, path.name)


def check(fx, folder, name):
    """Every item of the loaded fixture FX (weight parts in FOLDER) -> common.parity.Report titled NAME."""
    setup = Setup(fx, folder, name)
    report = Report(setup.title)
    ours = {k: list(v.shape) for k, v in setup.script.build(setup.args, setup.num_classes).model.state_dict().items()}
    theirs = {k: list(v.shape) for k, v in setup.weights[torch.float32].items()}
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    report.exact("layout (state-dict keys and shapes)", not differ,
                 f"{len(differ)} keys differ, e.g. {[(k, ours.get(k), theirs.get(k)) for k in differ[:3]]}")
    if report.failed():
        return report

    if "canonical" in fx:
        check_forward(report, "canonical", setup, setup.pair(), fx["canonical"])
    ind_key = next((k for k in fx.get("canonical", {}) if k.startswith("ind_mode_loss_terms")), None)
    if ind_key:
        ind = script_args(setup.script, setup.argv, setup.hyper, ind=True)
        check_forward(report, "canonical.ind", setup, setup.pair(ind),
                      {"loss_terms_by_epoch": {FULL_RAMP_EPOCH: fx["canonical"][ind_key]}})

    if "exact_weight_checksums" in fx:
        seed = setup.harness.get("init_seed", 0)
        torch.manual_seed(seed)
        regenerated = {k: v.detach() for k, v in setup.script.build(setup.args, setup.num_classes).model
                       .state_dict().items()}
        item = f"seed-{seed} weights regenerated (checksums)"
        report.checksums(item, regenerated, fx["exact_weight_checksums"], as_dtype(regenerated, torch.float64))
        if "exact" in fx and report.item(item).status != "FAIL":
            check_forward(report, "exact", setup, setup.pair(weights=regenerated), fx["exact"])

    if "float64_reference" in fx:
        ref = {k: v for k, v in fx["float64_reference"].items() if k != "note"}
        check_forward(report, "float64", setup, {torch.float64: setup.pair()[torch.float64]}, ref)

    runs = fx.get("original_train_step", {})
    if "train_metrics_from_original_train()" in runs:  # DML: a single run, no epoch level
        runs = {0: runs}
    for key, run in runs.items():
        ind = key == "ind_epoch0"
        args = script_args(setup.script, setup.argv, setup.hyper, ind=True) if ind else setup.args
        check_train_step(report, f"train_step[{key}]", setup, run, 0 if ind else key, args)

    if "detach_probe" in fx:
        check_detach_probe(report, setup, fx["detach_probe"])
    if "eval_mode_canonical" in fx:
        check_eval(report, setup, fx["eval_mode_canonical"])
    return report


def main(argv=None):
    torch.set_num_threads(1)  # our float32 rounding then does not depend on the machine's core count
    return checker_main("okddip", check_fixture, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
