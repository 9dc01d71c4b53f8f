"""Parity of dcm/ with the released code, on fixtures computed by it (../shared/fixtures/SCHEMA.md, section 1).

    python -m dcm.parity                       # every *_fixture.pt in the fixtures root's dcm/ folder
    python -m dcm.parity A_fixture.pt ...      # any fixture of the schema: any depth, width, class count, seed,
                                               # batch, WRN or MobileNet partner, float16-rounded weights

Each fixture is rebuilt as dcm/main.py builds its configuration. The initial weights come from the script's own
`build_networks` (seed, released init, CPU-RNG order) and must equal the stored ones bit for bit (their float16
rounding, and the checksums of the un-rounded values, for a rounded fixture; the stored checksums for MobileNet,
whose weights are not stored), and the stored RNG states must be the ones the released order leaves. From the stored
weights and batch our code then computes, through the script's own functions:

* the released test path (`test_outputs`): the logits of every head with eval-mode BN, MobileNet's logits with the
  batch statistics the released test path used, and the 24 loss terms and their sum on that path;
* one training iteration (`DCMRun.iteration`, with the Run's own optimizer: `make_optimizer` over
  `trainable_parameters` at the script's lr and weight decay): the train-mode logits of every head, the 24 loss
  terms and their sum, the checksum of every parameter and BN buffer after the step;
* a second train-mode forward after the step: its 24 loss terms and their sum.

Every quantity is computed in float32 (as the reference was, and once more in the channels_last layout: other
kernels and summation orders) and in float64 from the same weights and batch, and common/parity.py derives each
item's tolerance from the measured float32 rounding, the larger of the two (common.parity.RULE). The
post-step checksums must see weight decay's relative change of a weight in one step (lr x weight decay = 5e-5): an
entry whose float32 rounding is larger than that (MobileNet's first step is ill-conditioned: the loss goes from 29.8
to 49.5) is reported as not comparable in float32; the DCM fixtures carry no float64 reference to check it instead.
"""
import copy
import pathlib
import sys

import torch

from common import parity as core
from common.fast import Fast
from common.options import detached_setup
from common.parity import F64, FixtureError, Report
from dcm import losses
from dcm import main as script
from dcm.convert import flat_to_wrn, wrn_to_flat
from dcm.resnet import WRN, wrn_hyper

HEADS = ("aux1", "aux2", "final")
REQUIRED_KEYS = ("config", "net1_init", "input", "target", "loss_term_names", "outputs_train_mode",
                 "outputs_eval_mode", "loss_terms_train", "loss_train", "loss_terms_test_path_init",
                 "loss_test_path_init", "after_one_sgd_step")


def configuration(fx, name):
    """The script's options for the fixture's configuration, its class count and whether its weights are rounded."""
    missing = [k for k in REQUIRED_KEYS if k not in fx]
    if missing:
        raise FixtureError(f"{name}: missing keys {missing} (SCHEMA.md, section 1)")
    cfg = fx["config"]
    try:
        depth, width, seed = int(cfg["depth"]), float(cfg["width"]), int(cfg["init_seed"])
    except (KeyError, TypeError, ValueError) as e:
        raise FixtureError(f"{name}: config needs depth, width and init_seed ({e!r})") from e
    mobile = "net2_init_checksums" in fx
    variant = cfg.get("variant")
    if (variant is not None and str(variant).startswith("wrn_mobi") != mobile) or not (mobile or "net2_init" in fx):
        raise FixtureError(f"{name}: a MobileNet fixture ('wrn_mobi' variant) carries net2_init_checksums, a WRN "
                           f"pair fixture net2_init")
    try:
        wrn_hyper(depth, width)
    except ValueError as e:
        raise FixtureError(f"{name}: a configuration dcm/main.py does not run: {e}") from e
    args = script.get_args_parser().parse_args(["--depth", str(depth), "--width", repr(width), "--seed", str(seed),
                                                "--method", "dcm", "--net2", "mobilenet" if mobile else "wrn",
                                                "--device", "cpu"])
    return args, int(cfg.get("num_classes", 100)), bool(cfg.get("weights_fp16_rounded", False))


def released_state(net):
    """A network's state in the released layout: the flat dict for a WRN, the state_dict (no `module.`) for
    MobileNet."""
    state = net.state_dict()
    return wrn_to_flat(state) if isinstance(net, WRN) else state


def check_checksums(report, name, state, stored):
    """Exact weights against stored checksums: float64 sums of the same float32 values, so float64 agreement."""
    report.equal(f"{name}: keys and shapes", [(k, list(v.shape)) for k, v in state.items()],
                 [(k, list(c["shape"])) for k, c in stored.items()])
    if list(state) != list(stored):
        return
    vectors = [core.checksum_vectors(state[k], state[k], stored[k]) for k in stored]
    if any(v is None for v in vectors):
        report.exact(f"{name} = stored checksums", False, "a tensor smaller than its stored leading values")
        return
    report.float64(f"{name} = stored checksums", torch.cat([e for _, e, _ in vectors]),
                   torch.cat([r for _, _, r in vectors]), F64["loss"], scale=1.0)


def check_initial_weights(report, fx, args, num_classes, rounded):
    """Regenerate the initial weights through the script and check them; return the networks holding the weights
    the references were computed with (float32)."""
    if "rng_state_before_net1" in fx:
        torch.manual_seed(args.seed)
        report.exact("RNG state before net 1 = torch.manual_seed(init_seed)",
                     torch.equal(torch.get_rng_state(), fx["rng_state_before_net1"]))
    rng_key = "rng_state_before_mobilenet" if args.net2 == "mobilenet" else "rng_state_before_net2"
    if rng_key in fx:
        net = WRN(args.depth, args.width, num_classes)
        torch.manual_seed(args.seed)
        net.reset_parameters_as_released()
        report.exact(f"{rng_key} = the RNG state net 1's released init leaves",
                     torch.equal(torch.get_rng_state(), fx[rng_key]))
    nets = script.build_networks(args, num_classes)
    for label, net in zip(("net1", "net2"), nets):
        ours = released_state(net)
        if f"{label}_init" not in fx:  # MobileNet: weights not stored, their checksums are
            check_checksums(report, f"{label} initial weights regenerated", ours, fx[f"{label}_init_checksums"])
            continue
        stored = fx[f"{label}_init"]
        report.equal(f"{label} initial weights: keys and shapes", [(k, list(v.shape)) for k, v in ours.items()],
                     [(k, list(v.shape)) for k, v in stored.items()])
        if list(ours) == list(stored):
            expected = {k: v.half() if rounded and v.is_floating_point() else v for k, v in ours.items()}
            wrong = [k for k in stored if not torch.equal(expected[k], stored[k])]
            report.exact(f"{label} initial weights regenerated{' (float16-rounded)' if rounded else ''} = stored, "
                         f"bit for bit", not wrong, f"{len(wrong)} tensors differ, e.g. {wrong[:3]}" if wrong else "")
        if f"{label}_init_exact_checksums" in fx:
            check_checksums(report, f"{label} un-rounded initial weights regenerated", ours,
                            fx[f"{label}_init_exact_checksums"])
        net.load_state_dict(flat_to_wrn(core.as_dtype(stored, torch.float32)))
    return nets


def compute(nets, x, y, args, dtype):
    """Every checked quantity, computed by our code in DTYPE from NETS and the batch, through the training script's
    DCMRun (its optimizer, its first epoch's lr policy, its iteration): the released test path, one training
    iteration, a train-mode forward after it."""
    nets = [copy.deepcopy(net).to(dtype) for net in nets]
    x = x.to(dtype)
    run = script.DCMRun(detached_setup(Fast()), args, nets)
    r = {}
    with torch.no_grad():
        r["out_eval"], released = script.test_outputs(run.models, nets, run.archs, x)
        r["out_released_test"] = released[1]
        r["terms_test"] = losses.loss_terms(released, y)
    run.on_epoch_start(0)
    outputs, terms, _ = run.iteration(x, y)
    r["out_train"] = [[o.detach() for o in out] for out in outputs]
    r["terms_train"] = [t.detach() for t in terms]
    r["after"] = [{k: v.detach().clone() for k, v in released_state(net).items()} for net in nets]
    with torch.no_grad():
        r["terms_after"] = losses.loss_terms(script.forward_all(nets, x), y)
    return r


def check_fixture(path, args=None):
    """The report of one fixture (args: the command line's, unused)."""
    path = pathlib.Path(path)
    fx = core.load_fixture(path)
    options, num_classes, rounded = configuration(fx, path.name)
    cfg = fx["config"]
    report = Report(f"{path.name}: WRN-{options.depth}-{options.width:g} | "
                    f"{'MobileNet' if options.net2 == 'mobilenet' else 'WRN'}, {num_classes} classes, init seed "
                    f"{options.seed}, batch seed {cfg.get('batch_seed', 1)}"
                    f"{', float16-rounded weights' if rounded else ''}")
    nets = check_initial_weights(report, fx, options, num_classes, rounded)
    x, y = fx["input"], fx["target"]
    report.exact("labels within the class count", bool(((y >= 0) & (y < num_classes)).all()))
    ours32 = compute(nets, x, y, options, torch.float32)
    # A second float32 result of ours, with other kernels and summation orders: the spread is the larger of the two.
    layout = torch.channels_last
    other32 = compute([copy.deepcopy(net).to(memory_format=layout) for net in nets],
                      x.contiguous(memory_format=layout), y, options, torch.float32)
    ours64 = compute(nets, x, y, options, torch.float64)

    def logits(name, key, net, ref):
        a, c, b = (r[key] if net is None else r[key][net] for r in (ours32, other32, ours64))
        if len(ref) != len(HEADS):
            report.equal(f"{name}: number of heads", len(HEADS), len(ref))
            return
        report.entries(name, {h: (a[i], ref[i], b[i]) for i, h in enumerate(HEADS)},
                       also={h: [c[i]] for i, h in enumerate(HEADS)})

    def loss(name, key, ref_terms, ref_total):
        a, c, b, names = ours32[key], other32[key], ours64[key], list(fx["loss_term_names"])
        if len(ref_terms) != len(a) or len(names) != len(a):
            report.equal(f"{name}: number of terms", len(a), len(ref_terms))
            return
        report.entries(f"{name}: {len(a)} terms", {names[i]: (a[i], ref_terms[i], b[i]) for i in range(len(a))},
                       shared_spread=True, also={names[i]: [c[i]] for i in range(len(a))})
        report.float32(f"{name}: total", losses.total_loss(a), ref_total, losses.total_loss(b),
                       also=(losses.total_loss(c),))

    report.equal("loss term names and order", losses.term_names(ours32["out_train"]), list(fx["loss_term_names"]))
    evals = fx["outputs_eval_mode"]
    for i, label in enumerate(("net1", "net2")):
        logits(f"logits {label}, train-mode BN", "out_train", i, fx["outputs_train_mode"][label])
    loss("train loss", "terms_train", fx["loss_terms_train"], fx["loss_train"])
    logits("logits net1, eval-mode BN", "out_eval", 0, evals["net1"])
    if options.net2 == "mobilenet":
        logits("logits net2, eval-mode BN", "out_eval", 1, evals["net2_true_eval_mode"])
        released = next((k for k in evals if k.startswith("net2_as_original_test_path")), None)
        if released is None:
            raise FixtureError(f"{path.name}: outputs_eval_mode has no net2_as_original_test_path entry")
        logits("logits net2, released test path (batch-statistics BN)", "out_released_test", None, evals[released])
    else:
        logits("logits net2, eval-mode BN", "out_eval", 1, evals["net2"])
    loss("released test-path loss", "terms_test", fx["loss_terms_test_path_init"], fx["loss_test_path_init"])
    after = fx["after_one_sgd_step"]
    weight_decay_step = options.lr * options.weight_decay  # relative change of a weight by weight decay in one step
    for i, label in enumerate(("net1", "net2")):
        stored = after[f"{label}_checksums"]
        report.equal(f"{label} after one step: keys", list(ours32["after"][i]), list(stored))
        report.checksums(f"{label} after one step: params and BN buffers ({len(stored)} checksums)",
                         ours32["after"][i], stored, ours64["after"][i], detect=weight_decay_step,
                         also=[other32["after"][i]])
    loss("loss after one step, same batch", "terms_after", after["loss_terms"], after["loss_train_same_batch"])
    return report


def main(argv=None):
    return core.checker_main("dcm", check_fixture, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
