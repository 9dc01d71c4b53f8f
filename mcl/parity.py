"""Parity of mcl/ with the authors' code on the L-MCL fixtures (one iteration of main_layer_mcl_cifar_meta.py,
meta step included; SCHEMA.md section 4).

    python -m mcl.parity [FIXTURE.pt ...] [--fixtures-root DIR] [--no-meta]

For each fixture: rebuild the pair it names (any CIFAR pair of the script, heterogeneous ones with their
`net1.`/`net2.` keys; any seed or batch), load its weights (all weight files merged, float16 entries cast, sha256
checked) and run the iteration through the training script's own code, its Run (mcl.runs.LMCLRun): its optimizers
(`make_optimizers`), its lr policy at epoch 0 (`on_epoch_start`), its step (`ordinary_step`) and its meta step
(`MetaStep.step`). It is run
in float32 as the reference was and in float64 from the same weights and input; the float32 run is repeated with the
batch in reverse order, in channels_last and with PyTorch's native convolution kernels instead of oneDNN's (the
meta step: default and native kernels), which computes the same math with other summation orders.

Float32 items (common.parity rule): train-mode outputs, every loss term and the 18-entry breakdown, the gradient
norms and parameter changes of the main step, the meta step's objective values at each virtual point, the weight
network's hypergradient and its state after the step, the extra BatchNorm update. Each item's tolerance is
SPREAD_MULTIPLE times the largest float32-vs-float64 spread of those runs; an item whose tolerance exceeds what it
must detect is "not comparable in float32" (the meta trajectory through deep nets) and is checked by the float64
items: every loss (F64 loss), the meta objective values, the hypergradient of the authors' recursion and of the
exact one, and the weight network after its step (F64 meta), all against the fixture's float64 reference.
"""
import contextlib
import hashlib
import pathlib
import sys

import torch

from common.fast import Fast
from common.options import detached_setup
from common.parity import F64, FixtureError, Report, as_dtype, checker_main, load_fixture, load_weight_files
from mcl.lmcl import MetaStep
from mcl.main_layer_mcl_cifar_meta import get_args_parser
from mcl.models import CIFAR_PAIRS, Aggregator, EmbedHeads, LossWeightNetwork, build_cifar_pair
from mcl.runs import LMCLRun

REQUIRED = ("args", "weight_files", "weights", "input", "labels", "outputs", "losses")
# further float32 evaluations of the same math: their spreads join the default run's (common.parity `also`)
VARIANTS = ("default", "reversed batch", "channels_last", "native kernels")
META_VARIANTS = ("default", "native kernels")  # the meta step costs ~10 ordinary steps: two runs
# loss terms compared together share one spread (common.parity shared_spread): terms of like conditioning; the soft
# terms are KLs between nearly equal distributions, whose relative rounding is far larger than the others'
LOSS_GROUPS = {"classification": ("stage_ce", "aggregated_ce", "loss_cls"),
               "logit_kd": ("logit_kd_terms", "loss_logit_kd"), "contrastive": ("vcl", "icl"),
               "soft_contrastive": ("soft_vcl", "soft_icl"), "loss_mcl": ("loss_mcl",), "total": ("total",)}
MCL_TERMS = ("vcl", "soft_vcl", "icl", "soft_icl")
INNER_GROUPS = {"": ("loss_mcl", "vcl", "icl"), " soft terms": ("soft_vcl", "soft_icl")}
INNER_TERMS = ("loss_mcl",) + MCL_TERMS


# ------------------------------------------------------------------------------------------- the fixture ----
def read(path):
    """The fixture dict and the pair's merged weights; FixtureError when it cannot be checked."""
    path = pathlib.Path(path)
    fixture = load_fixture(path)
    missing = [k for k in REQUIRED if k not in fixture]
    if missing:
        raise FixtureError(f"{path.name} lacks {missing}: not an L-MCL fixture (SCHEMA.md section 4)")
    arch = fixture["args"].get("arch")
    if arch not in CIFAR_PAIRS:
        raise FixtureError(f"{path.name}: arch {arch!r} is not a pair of main_layer_mcl_cifar_meta.py")
    for part, name in fixture["weight_files"].items():
        expected = fixture.get("weight_file_sha256", {}).get(part)
        file = path.parent / name
        if expected and file.is_file() and hashlib.sha256(file.read_bytes()).hexdigest() != expected:
            raise FixtureError(f"weight file {file} does not match its sha256 in {path.name}")
    return fixture, load_weight_files(path.parent, fixture["weight_files"].values())


def options(fixture):
    """The script's arguments: its own defaults, overridden by the fixture's `args`."""
    args = get_args_parser().parse_args(["--arch", fixture["args"]["arch"]])
    vars(args).update(fixture["args"])
    return args


def build(fixture, state, dtype):
    """Pair, embed heads, aggregator and loss-weight network of the fixture with its weights, in DTYPE, train mode
    (the head widths as the fixture records them)."""
    args = options(fixture)
    rep_dim, number_stage = fixture["args"]["rep_dim"], fixture["args"]["number_stage"]
    modules = (build_cifar_pair(args.arch, 100, args.number_net), EmbedHeads(rep_dim, number_stage, args.feat_dim),
               Aggregator(rep_dim, number_stage), LossWeightNetwork(fixture["args"]["feat_dims"]))
    w = fixture["weights"]
    for module, weights, name in zip(modules, (state, w["criterion_mcl"], w["aggregator"], w["loss_weight_network"]),
                                     ("pair", "criterion_mcl", "aggregator", "loss_weight_network")):
        try:
            module.load_state_dict(as_dtype(weights, dtype))
        except RuntimeError as e:
            raise FixtureError(f"the {name} weights do not fit {args.arch}: {str(e)[:400]}") from e
        module.to(dtype).train()
    return modules, args


# ------------------------------------------------------------------------------ one iteration, ours ----
def kernels(variant):
    """The native convolution kernels for the 'native kernels' run, the default (oneDNN on x86) otherwise."""
    return torch.backends.mkldnn.flags(enabled=False) if variant == "native kernels" else contextlib.nullcontext()


def iteration(fixture, state, dtype, variant="default", meta=True, exact=False):
    """One iteration of the script on the fixture's batch with our code: every quantity the fixture stores."""
    (pair, embed, aggregator, weight_net), args = build(fixture, state, dtype)
    x, y = fixture["input"].to(dtype), fixture["labels"]
    order = torch.arange(len(y) - 1, -1, -1) if variant == "reversed batch" else torch.arange(len(y))
    x, y = x[order], y[order]
    fast = Fast(channels_last=variant == "channels_last")
    x, y = fast.inputs(x, y)
    with kernels(variant):
        run = LMCLRun(detached_setup(fast), args, (pair, embed, aggregator, weight_net))
        run.on_epoch_start(0)  # the fixture is the first iteration of epoch 0
        lr = run.lr
        before = {k: p.detach().clone() for k, p in pair.named_parameters()}
        out = run.ordinary_step(x, y)
        result = {"lr": lr, "outputs": per_sample_outputs(out, y, order), "losses": losses_of(out),
               "breakdown": out["mcl_breakdown"],
               "grad_norms": {f"{prefix}.{k}": p.grad.norm().item()
                              for prefix, module in (("net", pair), ("criterion_mcl", embed),
                                                     ("aggregator", aggregator))
                              for k, p in module.named_parameters() if p.grad is not None},
               "param_delta_norms": {k: (p.detach() - before[k]).norm().item() for k, p in pair.named_parameters()},
               "buffer_keys": [k for k, v in pair.state_dict().items() if v.is_floating_point()
                               and k not in before]}
        if meta:
            result["meta"] = meta_step(run, x, y, exact)
    return result


def per_sample_outputs(out, y, order):
    """The train-mode outputs in the fixture's sample order (ORDER undone)."""
    back = torch.argsort(order)

    def restore(t):
        return t.detach()[back]

    def per_head(nets):
        return {f"{i}.{j}": restore(t) for i, net in enumerate(nets) for j, t in enumerate(net)}
    return {"raw_features": per_head(out["features"]), "logits": per_head(out["logits"]),
            "aggregated_logits": {str(i): restore(z) for i, z in enumerate(out["aggregated_logits"])},
            "aggregator_stage_weights": {str(i): restore(w) for i, w in enumerate(out["aggregator_stage_weights"])},
            "lwn_weights": {str(n): restore(w) for n, w in enumerate(out["lwn_weights"])},
            "projected_embeddings": per_head(out["embeddings"]),
            "train_top1_correct": {f"{i}.{j}": float((z.argmax(1) == y).sum()) for i, net in enumerate(out["logits"])
                                   for j, z in enumerate(net)}}


def losses_of(out):
    """Every loss term as {name[index]: float tensor}, nested lists flattened."""
    flat = {}
    for group in LOSS_GROUPS.values():
        for key in group:
            for index, value in _indexed(out[key]):
                flat[key + index] = value.detach()
    return flat


def _indexed(value, prefix=""):
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in _indexed(v, f"{prefix}[{i}]")]
    return [(prefix, value)]


def meta_step(run, x, y, exact):
    """The meta step as the training loop runs it (the Run's MetaStep.step after the ordinary step), with what the
    fixture records of it; EXACT adds the exact hypergradient (same point, computed first: it changes nothing)."""
    result = {}
    pair, args = run.pair, run.args
    if exact:
        result["hypergradient_exact"] = MetaStep(pair, run.embed_heads, run.weight_net, args,
                                                 exact=True).hypergradient(x, y, run.lr)
    params = {k: p.detach().clone() for k, p in pair.named_parameters()}
    means = {k: b.clone() for k, b in pair.named_buffers() if k.endswith("running_mean")}
    hyper = run.meta.step(x, y, run.lr, run.weight_optimizer)
    buffers = dict(pair.named_buffers())
    inner, outer = as_called(run.meta.record)
    result.update(
        hypergradient=hyper, inner=[{k: float(c[k]) for k in INNER_TERMS} for c in inner],
        outer=[float(v) for v in outer], weight_net_after=run.weight_net.state_dict(),
        bn_running_mean_change=max(float((buffers[k] - v).abs().max()) for k, v in means.items()),
        parameters_unchanged=all(torch.equal(params[k], p) for k, p in pair.named_parameters()),
        buffers=buffers)
    return result


def as_called(record):
    """The objective values of one meta step in the order the authors' code evaluates them (what the fixture
    records): L_0 .. L_{times-1} (MCL) and L_times (CE) in the virtual steps, the meta objective, then L_times ..
    L_0 again in their reverse sweep, which recomputes each at the same point. Ours evaluates each point once."""
    inner, (last, objective) = record["inner"], record["outer"]
    return inner + inner[::-1], [last, objective, last]


# --------------------------------------------------------------------------------------------- the report ----
def compare(report, name, ref, runs32, run64, pick, **kwargs):
    """A float32 item over the entries {key: reference} of REF: ours32 from the default run, the other runs as ALSO,
    ours64 from the float64 run. PICK(run) -> {key: value}. Keys the reference has and we do not fail the item."""
    ours = {variant: pick(run) for variant, run in runs32.items()}
    ours64 = pick(run64)
    missing = [k for k in ref if k not in ours64]
    if missing:
        report.exact(name, False, f"{len(missing)} reference entries not produced, e.g. {missing[:3]}")
        return
    default = ours.pop("default")
    report.entries(name, {k: (default[k], r, ours64[k]) for k, r in ref.items()},
                   also={k: [o[k] for o in ours.values()] for k in ref}, **kwargs)


def check(path, meta=True, exact=True, variants=VARIANTS):
    """Report for one fixture; META=False skips the meta step (float32 and float64), EXACT=False its exact
    hypergradient (the slow parts). VARIANTS: the float32 runs whose spreads set the tolerances ("default" first;
    fewer runs measure less of the rounding: only for checks that decide in float64)."""
    fixture, state = read(path)
    report = Report(pathlib.Path(path).name)
    meta = meta and "meta_step" in fixture
    ref64 = fixture.get("float64_reference")
    runs32 = {v: iteration(fixture, state, torch.float32, v, meta=meta and v in META_VARIANTS) for v in variants}
    run64 = iteration(fixture, state, torch.float64, meta=meta,
                      exact=exact and "loss_weight_network_grads_exact_unrolled" in (ref64 or {}))
    check_outputs(report, fixture, runs32, run64)
    check_losses(report, fixture, runs32, run64)
    if "main_step" in fixture:
        check_main_step(report, fixture["main_step"], runs32, run64)
    if meta:
        meta32 = {v: runs32[v] for v in variants if v in META_VARIANTS}
        check_meta_step(report, fixture["meta_step"], meta32, run64)
    if ref64 is not None:
        check_float64(report, ref64, run64)
    return report


def check_outputs(report, fixture, runs32, run64):
    for key, ref in fixture["outputs"].items():
        if key not in run64["outputs"]:
            report.exact(f"outputs.{key}", False, "a quantity this checker does not know")
            continue
        if key == "train_top1_correct":  # counts: exact, unless our float32 and float64 argmax disagree (a tie)
            entries = {f"{i}.{j}": v for i, net in enumerate(ref) for j, v in enumerate(net)}
            compare(report, "outputs.train_top1_correct", entries, runs32, run64,
                    lambda run: run["outputs"][key], scale=1.0)
            continue
        if key == "lwn_weights" or key in ("aggregated_logits", "aggregator_stage_weights"):
            entries = {str(i): v for i, v in enumerate(ref)}
        else:
            entries = {f"{i}.{j}": v for i, net in enumerate(ref) for j, v in enumerate(net)}
        compare(report, f"outputs.{key}", entries, runs32, run64, lambda run, key=key: run["outputs"][key])


def check_losses(report, fixture, runs32, run64):
    ref = fixture["losses"]
    for group, keys in LOSS_GROUPS.items():
        entries = {key + index: value for key in keys if key in ref for index, value in _indexed(ref[key])}
        compare(report, f"losses.{group}", entries, runs32, run64, lambda run: run["losses"], shared_spread=True)
    breakdown = ref.get("mcl_breakdown")
    if breakdown:
        ours = [(b["i"], b["j"], b["k"], b["z"]) for b in run64["breakdown"]]
        report.equal("losses.mcl_breakdown order (i, j, k, z)", ours, [(b["i"], b["j"], b["k"], b["z"])
                                                                       for b in breakdown])
        for term in MCL_TERMS:
            compare(report, f"losses.mcl_breakdown.{term}", {term: [b[term] for b in breakdown]}, runs32, run64,
                    lambda run, term=term: {term: [b[term] for b in run["breakdown"]]})


def check_main_step(report, ref, runs32, run64):
    if "lr" in ref:
        report.equal("main_step.lr (lr_at_epoch, epoch 0)", run64["lr"], ref["lr"])
    grads = ref.get("grad_norms", {})
    if grads:
        report.equal("main_step.grad_norms keys", sorted(run64["grad_norms"]), sorted(grads))
        # an analytically zero gradient (a bias feeding a BatchNorm) is compared in absolute terms, against the
        # gradient norm of its layer's weight
        zero = {k for k in grads if k.endswith(".bias") and k in run64["grad_norms"]
                and run64["grad_norms"][k] <= 1e-9 * run64["grad_norms"].get(k[:-4] + "weight", 0.0)}
        compare(report, "main_step.grad_norms", {k: v for k, v in grads.items() if k not in zero}, runs32, run64,
                lambda run: run["grad_norms"])
        if zero:
            floor = max(run64["grad_norms"][k[:-4] + "weight"] for k in zero)
            compare(report, "main_step.grad_norms (zero: biases feeding a BatchNorm)",
                    {k: grads[k] for k in zero}, runs32, run64, lambda run: run["grad_norms"], scale=floor)
    deltas = ref.get("param_delta_norms", {})
    if deltas:
        params = set(run64["param_delta_norms"])
        report.equal("main_step.param_delta_norms keys", sorted(deltas),
                     sorted(params | set(run64["buffer_keys"])))
        # buffers: the reference stores the step's change only (0); the optimizer never moves them
        report.exact("main_step.param_delta_norms of buffers (0)",
                     all(v == 0.0 for k, v in deltas.items() if k not in params))
        compare(report, "main_step.param_delta_norms", {k: v for k, v in deltas.items() if k in params}, runs32,
                run64, lambda run: run["param_delta_norms"])


def check_meta_step(report, ref, runs32, run64):
    inner, outer = ref.get("inner_objective_calls", []), ref.get("outer_objective_calls", [])
    # call order: theta0, theta1 (virtual steps), then theta1, theta0 (recomputations of the reverse sweep)
    for point, calls in (("theta0", (0, 3)), ("theta1", (1, 2))):
        for group, terms in INNER_GROUPS.items():
            entries = {f"{c}.{t}": inner[c][t] for c in calls if c < len(inner) for t in terms}
            compare(report, f"meta_step.inner_objective_calls[{point}]{group}", entries, runs32, run64,
                    lambda run: {f"{c}.{t}": v[t] for c, v in enumerate(run["meta"]["inner"]) for t in INNER_TERMS},
                    shared_spread=True)
    for point, calls in (("theta2", (0, 2)), ("theta3", (1,))):  # theta2, theta3 (the objective), theta2 again
        compare(report, f"meta_step.outer_objective_calls[{point}]",
                {str(c): outer[c] for c in calls if c < len(outer)}, runs32, run64,
                lambda run: {str(c): v for c, v in enumerate(run["meta"]["outer"])}, shared_spread=True)
    for key, ours in (("loss_weight_network_grads", "hypergradient"), ("loss_weight_network_after",
                                                                       "weight_net_after")):
        if key in ref:
            compare(report, f"meta_step.{key}", ref[key], runs32, run64, lambda run, ours=ours: run["meta"][ours])
    if "bn_running_mean_max_abs_change_during_meta" in ref:
        compare(report, "meta_step.bn_running_mean_max_abs_change_during_meta",
                {"": ref["bn_running_mean_max_abs_change_during_meta"]}, runs32, run64,
                lambda run: {"": run["meta"]["bn_running_mean_change"]})
    rollback = [ref[k] for k in ("rollback_max_abs_diff_net_params", "rollback_max_abs_diff_embed_heads") if k in ref]
    report.exact("meta_step.rollback (parameters as before the meta step)",
                 run64["meta"]["parameters_unchanged"] and all(v == 0.0 for v in rollback))
    for key, n in ref.get("num_batches_tracked_after", {}).items():
        report.equal(f"meta_step.num_batches_tracked_after {key}", int(run64["meta"]["buffers"][key]), n)
    if "meta_optimizer_state_entries_after" in ref:  # ours keeps no virtual-optimizer state at all
        report.equal("meta_step.meta_optimizer_state_entries_after", 0, ref["meta_optimizer_state_entries_after"])


def check_float64(report, ref64, run64):
    for key, value in ref64.get("losses", {}).items():
        ours = [v for k, v in run64["losses"].items() if k == key or k.startswith(key + "[")]
        report.float64(f"float64.losses.{key}", ours, value, F64["loss"])
    meta = run64.get("meta")
    if meta is None:
        return
    if "meta_inner_objective_calls" in ref64:
        report.float64("float64.meta_inner_objective_calls", [c["loss_mcl"] for c in meta["inner"]],
                       ref64["meta_inner_objective_calls"], F64["meta"])
    if "meta_outer_objective_calls" in ref64:
        report.float64("float64.meta_outer_objective_calls", meta["outer"], ref64["meta_outer_objective_calls"],
                       F64["meta"])
    for tag, ours_key, ref_key in (("original", "hypergradient", "loss_weight_network_grads_original_metasgd"),
                                   ("exact", "hypergradient_exact", "loss_weight_network_grads_exact_unrolled")):
        if ref_key in ref64 and ours_key in meta:
            names = list(ref64[ref_key])
            report.float64(f"float64.meta.hypergradient ({tag})", [meta[ours_key].get(k) for k in names],
                           [ref64[ref_key][k] for k in names], F64["meta"])
    after = ref64.get("loss_weight_network_after_original")
    if after is not None:
        report.float64("float64.loss_weight_network_after", [meta["weight_net_after"][k] for k in after],
                       list(after.values()), F64["meta"])


# ------------------------------------------------------------------------------------------------ command ----
def add_arguments(parser):
    parser.add_argument("--no-meta", action="store_true", help="skip the meta step (float32 and float64)")


def check_fixture(path, args):
    return check(path, meta=not args.no_meta)


if __name__ == "__main__":
    sys.exit(checker_main("mcl", check_fixture, __doc__, add_arguments=add_arguments))
