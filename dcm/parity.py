"""Exact parity of dcm/ with the released code, on the reference fixtures.

    python -m dcm.parity                       # every *_fixture.pt in ../shared/fixtures/dcm
    python -m dcm.parity A_fixture.pt ...      # any fixture in that format (any depth, width, seed, batch, partner)

For each fixture it rebuilds the configuration, regenerates the initial weights from the stored seed / RNG state
and checks them against the stored weights or checksums, loads the stored weights, and checks: logits of every head
(train-mode and eval-mode BN, and MobileNet's released test path), each of the loss terms and their sum on the
training path and on the released test path, the checksum of every parameter and buffer after one SGD step
(lr 0.1, momentum 0.9, wd 5e-4), and the loss terms of a second forward after that step. It prints the largest
error of each item and exits 0 only when every item is within tolerance.
"""
import argparse
import copy
import math
import pathlib
import sys

import torch

from dcm.convert import flat_to_wrn, wrn_to_flat
from dcm.losses import loss_terms, term_names, total_loss
from dcm.mobilenet import MobileNet
from dcm.resnet import WRN

DEFAULT_FOLDER = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "dcm"
TOLERANCES = {  # (logits atol, loss rtol, checksum rtol)
    "cpu": (1e-5, 1e-6, 1e-5),
    "cuda": (1e-4, 1e-5, 1e-4),  # TF32 disabled below
}


def checksum(t):
    t = t.detach().cpu().double().reshape(-1)
    return {"sum": t.sum().item(), "abs_sum": t.abs().sum().item(), "sq_sum": (t * t).sum().item(),
            "first": t[:5].tolist()}


def checksum_error(ours, ref):
    """Largest error between two checksums: sums relative to the reference's abs_sum, first values absolute."""
    if "shape" in ours and "shape" in ref and list(ours["shape"]) != list(ref["shape"]):
        return math.inf
    scale = max(ref["abs_sum"], 1e-12)
    errs = [abs(ours["sum"] - ref["sum"]) / scale, abs(ours["abs_sum"] - ref["abs_sum"]) / scale,
            abs(ours["sq_sum"] - ref["sq_sum"]) / max(ref["sq_sum"], 1e-12)]
    errs += [abs(a - b) for a, b in zip(ours["first"], ref["first"])]
    if len(ours["first"]) != len(ref["first"]):
        return math.inf
    return max(errs)


def state_checksums(state):
    out = {}
    for k, v in state.items():
        c = checksum(v)
        c["shape"] = list(v.shape)
        out[k] = c
    return out


def max_checksum_error(ours, ref):
    """(largest error, worst key); a key missing on either side is an infinite error."""
    if list(ours) != list(ref):
        missing = [k for k in ref if k not in ours] + [k for k in ours if k not in ref]
        return math.inf, f"key mismatch {missing[:3]}"
    worst = max(ref, key=lambda k: checksum_error(ours[k], ref[k]))
    return checksum_error(ours[worst], ref[worst]), worst


def as_float32(state):
    """Fixture weights may be float16 (rounded fixtures): the references were computed with their float32 casts."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def abs_err(a, b):
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


def rel_err(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


class Report:
    def __init__(self, name):
        self.name, self.rows, self.ok = name, [], True

    def add(self, item, err, tol, note=""):
        good = err <= tol
        self.ok &= good
        self.rows.append((item, err, tol, good, note))

    def print(self):
        print(f"== {self.name}")
        width = max(len(r[0]) for r in self.rows)
        for item, err, tol, good, note in self.rows:
            print(f"  {'ok  ' if good else 'FAIL'} {item:<{width}}  max err {err:.3e}  (tol {tol:.0e}){note}")
        print(f"  -> {'PASS' if self.ok else 'FAIL'}")


def build_pair(fx):
    """Rebuild the fixture's networks with the released init; return (net1, net2, net2 arch, regen report rows)."""
    cfg = fx["config"]
    depth, width, num_classes = int(cfg["depth"]), float(cfg["width"]), int(cfg.get("num_classes", 100))
    mobile = "net2_init_checksums" in fx
    rows = []
    rounded = bool(cfg.get("weights_fp16_rounded", False))

    # Regenerate from the seed exactly as dcm/main.py does: build, re-seed, re-initialise in the released order.
    net1 = WRN(depth, width, num_classes)
    net2 = MobileNet(num_classes) if mobile else WRN(depth, width, num_classes)
    torch.manual_seed(int(cfg["init_seed"]))
    if "rng_state_before_net1" in fx:
        rows.append(("rng state before net1 (from init_seed)",
                     0.0 if torch.equal(torch.get_rng_state(), fx["rng_state_before_net1"]) else math.inf, 0.0))
    net1.reset_parameters_as_released()
    rng_after_net1 = torch.get_rng_state()
    rng_key = "rng_state_before_mobilenet" if mobile else "rng_state_before_net2"
    rows.append((f"{rng_key} (after net1 init)",
                 0.0 if torch.equal(rng_after_net1, fx[rng_key]) else math.inf, 0.0))
    if mobile:
        torch.set_rng_state(fx["rng_state_before_mobilenet"])
        net2 = MobileNet(num_classes)  # PyTorch default init from the stored RNG state, as released
    else:
        torch.set_rng_state(fx["rng_state_before_net2"])
        net2.reset_parameters_as_released()

    # Compare the regenerated weights with the stored ones (or their checksums).
    for label, net, key in (("net1", net1, "net1_init"), ("net2", net2, "net2_init")):
        ours = wrn_to_flat(net.state_dict()) if isinstance(net, WRN) else net.state_dict()
        if key in fx:
            ref = fx[key]
            if list(ref) != list(ours):
                rows.append((f"{label} init regenerated from seed (key layout)", math.inf, 0.0))
                continue
            if rounded:
                err = max(abs_err(ours[k].half().float() if ours[k].is_floating_point() else ours[k], ref[k].float())
                          for k in ref)
                rows.append((f"{label} init regenerated, fp16-rounded vs stored", err, 0.0))
                exact = fx.get(f"{key}_exact_checksums")
                if exact is not None:
                    err, worst = max_checksum_error(state_checksums(ours), exact)
                    rows.append((f"{label} init regenerated vs exact checksums", err, 1e-7))
            else:
                err = max(abs_err(ours[k], ref[k]) for k in ref)
                rows.append((f"{label} init regenerated from seed vs stored", err, 0.0))
        else:
            err, worst = max_checksum_error(state_checksums(ours), fx[f"{key}_checksums"])
            rows.append((f"{label} init regenerated from RNG state vs checksums", err, 1e-7))

    # Load the stored weights (they define the references; for MobileNet the regenerated ones are the stored ones).
    net1.load_state_dict(flat_to_wrn(as_float32(fx["net1_init"])))
    if not mobile:
        net2.load_state_dict(flat_to_wrn(as_float32(fx["net2_init"])))
    return net1, net2, ("mobilenet" if mobile else "wrn"), rows


def compute(net1, net2, arch2, x, y, device, channels_last=False, step_only=False):
    """Every checked quantity (step_only: only those after the SGD step). channels_last=True computes them in
    another memory layout, i.e. with other convolution kernels and summation orders: a second correct float32
    result."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net1 = copy.deepcopy(net1).to(device, memory_format=layout)
    net2 = copy.deepcopy(net2).to(device, memory_format=layout)
    x, y = x.to(device).contiguous(memory_format=layout), y.to(device)
    r = {}

    def fresh(train1, train2):
        return copy.deepcopy(net1).train(train1), copy.deepcopy(net2).train(train2)

    if not step_only:
        with torch.no_grad():
            a, b = fresh(True, True)
            r["out_train"] = [a(x), b(x)]
            r["terms_train"] = loss_terms(r["out_train"], y)
            a, b = fresh(False, False)
            r["out_eval"] = [a(x), b(x)]
            test_outputs = list(r["out_eval"])
            if arch2 == "mobilenet":  # the released test path never puts MobileNet in eval mode
                _, b = fresh(False, True)
                r["out_net2_released_test"] = b(x)
                test_outputs[1] = r["out_net2_released_test"]
            r["terms_test"] = loss_terms(test_outputs, y)

    # One released iteration: zero_grad, forward net1 then net2, the loss, backward, one SGD over both nets.
    a, b = fresh(True, True)
    optimizer = torch.optim.SGD(list(a.parameters()) + list(b.parameters()), lr=0.1, momentum=0.9,
                                weight_decay=5e-4, nesterov=False, dampening=0)
    optimizer.zero_grad()
    total_loss(loss_terms([a(x), b(x)], y)).backward()
    optimizer.step()
    for label, net in (("net1", a), ("net2", b)):
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        r[f"{label}_after"] = state_checksums(wrn_to_flat(state) if isinstance(net, WRN) else state)
    with torch.no_grad():
        r["terms_after"] = loss_terms([a(x), b(x)], y)
    return r


def check_fixture(path, device="cpu", strict=False):
    """Compare with the fixture.

    Before the SGD step everything is well conditioned and checked at the nominal tolerances (a loss term relative
    to the total loss it is part of). After the step, each entry's tolerance is the nominal one raised (unless
    strict) to 3x the entry's own rounding sensitivity: the distance between two correct float32 computations of
    this code (contiguous vs channels_last memory layout, i.e. other kernels and summation orders). A BN bias after
    one step is -lr x a near-cancelling sum, and with MobileNet's large first step two correct float32 runs differ by
    about 1e-3 there; the reference is one such run. A wrong formula is not hidden: it is wrong in both layouts.
    """
    fx = torch.load(path, map_location="cpu", weights_only=False)
    logit_tol, loss_tol, ck_tol = TOLERANCES["cuda" if str(device).startswith("cuda") else "cpu"]
    cfg = fx["config"]
    report = Report(f"{pathlib.Path(path).name}: {cfg.get('variant', '')}, depth {cfg['depth']}, "
                    f"width {cfg['width']}, seed {cfg['init_seed']}, batch {tuple(fx['input'].shape)}")
    net1, net2, arch2, rows = build_pair(fx)
    for item, err, tol in rows:
        report.add(item, err, tol)
    x, y = fx["input"], fx["target"]
    ours = compute(net1, net2, arch2, x, y, device)
    other = compute(net1, net2, arch2, x, y, device, channels_last=True, step_only=True)

    def add(item, pairs, nominal, error, floor=None):
        """pairs: (ours, other layout, reference); the item's error is its worst entry relative to its tolerance.
        floor: None (nominal only), "entry" (each entry's own sensitivity: tensors differ in conditioning) or
        "item" (the largest over the item: loss terms all derive from the same perturbed weights)."""
        if not pairs:
            report.add(item, math.inf, nominal, "  (nothing to compare)")
            return
        item_floor = max(error(o, e) for o, e, _ in pairs)
        worst = None
        for o, e, ref in pairs:
            err = error(o, ref)
            sensitivity = {"entry": error(o, e), "item": item_floor}.get(floor, 0.0) if not strict else 0.0
            tol = max(nominal, 3.0 * sensitivity)
            if worst is None or err / tol > worst[0] / worst[1]:
                worst = (err, tol)
        report.add(item, *worst)

    def outputs(item, o, e, ref):
        if len(o) != len(ref):
            report.add(item + " (number of heads)", math.inf, 0.0)
            return
        add(item, list(zip(o, e, ref)), logit_tol, abs_err)

    def terms(item, o, e, ref_terms, ref_total, floor=None):
        if len(o) != len(ref_terms):
            report.add(item + " (number of terms)", math.inf, 0.0)
            return
        scale = max(abs(float(ref_total)), 1e-12)  # a term's error relative to the loss it is summed into
        add(f"{item}: {len(o)} terms (error / total)", list(zip(o, e, ref_terms)), loss_tol,
            lambda a, b: abs(float(a) - float(b)) / scale, floor)
        add(f"{item}: total", [(total_loss(o), total_loss(e), ref_total)], loss_tol, rel_err, floor)

    report.add("loss term names and order", 0.0 if term_names(ours["out_train"]) == list(fx["loss_term_names"])
               else math.inf, 0.0)
    for i, label in enumerate(("net1", "net2")):
        outputs(f"logits {label}, train-mode BN", ours["out_train"][i], ours["out_train"][i],
                fx["outputs_train_mode"][label])
    terms("train loss", ours["terms_train"], ours["terms_train"], fx["loss_terms_train"], fx["loss_train"])
    evals = fx["outputs_eval_mode"]
    outputs("logits net1, eval-mode BN", ours["out_eval"][0], ours["out_eval"][0], evals["net1"])
    if arch2 == "mobilenet":
        outputs("logits net2, eval-mode BN", ours["out_eval"][1], ours["out_eval"][1], evals["net2_true_eval_mode"])
        key = next(k for k in evals if k.startswith("net2_as_original_test_path"))
        outputs("logits net2, released test path (train-mode BN)", ours["out_net2_released_test"],
                ours["out_net2_released_test"], evals[key])
    else:
        outputs("logits net2, eval-mode BN", ours["out_eval"][1], ours["out_eval"][1], evals["net2"])
    terms("released test-path loss", ours["terms_test"], ours["terms_test"], fx["loss_terms_test_path_init"],
          fx["loss_test_path_init"])
    after = fx["after_one_sgd_step"]
    for label in ("net1", "net2"):
        ref = after[f"{label}_checksums"]
        if list(ours[f"{label}_after"]) != list(ref):
            report.add(f"{label} after one SGD step: key layout", math.inf, 0.0)
            continue
        add(f"{label} params+buffers after one SGD step ({len(ref)} checksums)",
            [(ours[f"{label}_after"][k], other[f"{label}_after"][k], ref[k]) for k in ref], ck_tol, checksum_error, floor="entry")
    terms("loss after one step, same batch", ours["terms_after"], other["terms_after"], after["loss_terms"],
          after["loss_train_same_batch"], floor="item")
    return report


def fixture_paths(args_paths):
    if args_paths:
        return [pathlib.Path(p) for p in args_paths]
    if not DEFAULT_FOLDER.is_dir():
        raise SystemExit(f"no fixture given and the shared fixtures folder {DEFAULT_FOLDER} does not exist")
    paths = sorted(DEFAULT_FOLDER.glob("*_fixture.pt"))
    if not paths:
        raise SystemExit(f"no *_fixture.pt in {DEFAULT_FOLDER}")
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixtures", nargs="*", help="fixture files (default: every *_fixture.pt of the shared folder)")
    parser.add_argument("--device", default="cpu", help="cpu (tolerances of the spec) or cuda (TF32 off, looser)")
    parser.add_argument("--strict", action="store_true",
                        help="nominal tolerances only, without the per-entry float32 rounding floor")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    all_ok = True
    for path in fixture_paths(args.fixtures):
        if not path.is_file():
            print(f"== {path}: no such file")
            all_ok = False
            continue
        report = check_fixture(path, args.device, args.strict)
        report.print()
        all_ok &= report.ok
    print("ALL FIXTURES MATCH" if all_ok else "PARITY FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
