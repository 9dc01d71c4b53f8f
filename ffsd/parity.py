"""Check this implementation against fixtures computed with the authors' code (SCHEMA.md, section 2).

    python -m ffsd.parity [FIXTURE.pt ...] [--fixtures-root DIR] [--no-regeneration]

The configuration comes from the fixture: `meta.config` (model, init seed, epochs, float16 weights; the schema's
defaults when absent) and the number of students from the stored networks. Everything the fixture holds is computed
twice with this repository's own code, from the fixture's initial weights (float16 ones upcast exactly): in float32,
as the reference was, and in float64 (networks, weights, input and every loss term). common.parity then derives each
float32 item's tolerance from the measured float32-vs-float64 spread and prints error, tolerance and spread per item.

Items, per fixture:
    init_state networks and keys  the stored networks and state-dict keys are ours (else nothing more is checked)
    init regeneration       the scripts' seeded construction (build_networks) against init_state, or against
                            init_state_exact_checksums for a float16-rounded fixture; random draws have no float64
                            counterpart, so the tolerance is the rule's floor
    outputs_eval_mode_init  eval-mode logits of every network
    outputs_train_mode      the first forward of the training step: logits, feature maps, fused map, TransFusion
                            output, diversity target
  per stored epoch E (a step that raises is the failure `train_step epoch E`):
    losses_epochE_*         every loss term of the step; `... hyperparameters` checks the warmed-up lambdas and T
                            in float64
    real_step_capture_epochE  what the released step logged (and `... accuracies`, its train top-1 values)
    post_step_checksums_epochE  (sum, sum of squares) of every state tensor after one step made by the scripts' own
                            code: their FFSDRun (ffsd.train), with its six optimizers, its schedulers as built for
                            --start_epoch E, the epoch's lambdas and its train_step
    float64 ...             a fixture's `float64_reference`, if any: the keys above recomputed in float64, checked
                            in float64 (common.parity.F64)
"""
import re

import torch

from common.fast import Fast
from common.options import detached_setup
from common.parity import F64, FixtureError, Report, as_dtype, checker_main, checksum_vectors, load_fixture

from ffsd import training
from ffsd.losses import attention, diversity_target
from ffsd.models import CIFAR_MODELS, IMAGENET_MODELS
from ffsd.options import get_args_parser
from ffsd.train import FFSDRun

DEFAULT_CONFIG = {"model": "resnet20", "init_seed": 0, "batch_seed": 1, "epochs": [6, 1], "weights_fp16_rounded": False}
EPOCH_KEY = re.compile(r"losses_epoch(\d+)_(full_lambdas|warmup)$")
HYPERPARAMETERS = ("lambda_diversity", "lambda_fusion", "lambda_self_distillation", "temperature")
LOSS_NAMES = {"fusion/kl_to_student_mean_logits": "fusion/kl", "leader/kl_to_fusion": "leader/kl"}
CAPTURED_ACCURACIES = {"fusion/acc": "fusion/top1", "leader/acc": "leader/top1", "average_acc": "average/top1",
                       "ensemble(oracle)_acc": "ensemble_oracle/top1"}


# ------------------------------------------------------------------------------------------ configuration ----
def fixture_config(fixture):
    config = dict(DEFAULT_CONFIG)
    config.update((fixture.get("meta") or {}).get("config") or {})
    if config["model"] not in CIFAR_MODELS:
        kind = "an ImageNet model (the FFSD fixture schema is CIFAR-100)" if config["model"] in IMAGENET_MODELS \
            else "not a model of the scripts"
        raise FixtureError(f"meta.config.model {config['model']!r} is {kind}; CIFAR models: {', '.join(CIFAR_MODELS)}")
    return config


def model_num_of(init_state):
    """M from the stored networks: student0 .. student<M-1>."""
    students = sorted(int(m.group(1)) for m in (re.fullmatch(r"student(\d+)", name) for name in init_state) if m)
    if students != list(range(len(students))) or len(students) < 2:
        raise FixtureError(f"init_state holds students {students}; the scripts train student0 .. student<M-1>, M >= 2")
    return len(students)


def script_args(config, model_num, epoch):
    """The training script's options for this fixture: its defaults, the fixture's --model and --model_num, and
    --start_epoch EPOCH (a trainer that starts at EPOCH: lambda warm-up of EPOCH, schedulers as built)."""
    return get_args_parser("cifar100").parse_args(["--model", config["model"], "--model_num", str(model_num),
                                                   "--start_epoch", str(epoch)])


def networks(fixture, config, model_num, dtype):
    """The scripts' networks, seeded as the script builds them (so a dropout layer would draw from the RNG state the
    released trainer had), holding the fixture's initial weights in DTYPE."""
    torch.manual_seed(config["init_seed"])
    nets = training.build_networks(config["model"], "cifar100", model_num).to(dtype)
    for name, net in nets.named_networks().items():
        net.load_state_dict(as_dtype(fixture["init_state"][name], dtype))
    return nets


def state_of_networks(named):
    """{'<network>.<key>': tensor} over the networks' state dicts (the fixtures' checksum keys)."""
    return {f"{name}.{k}": v for name, net in named.items() for k, v in net.state_dict().items()}


# -------------------------------------------------------------------------------------------- computation ----
def eval_logits(fixture, config, model_num, dtype):
    nets = networks(fixture, config, model_num, dtype)
    nets.eval()
    return {f"{name}_logits": z for name, z in training.predict(nets, fixture["inputs"].to(dtype)).items()}


def one_step(fixture, config, model_num, epoch, dtype):
    """One training iteration at EPOCH through the script's own FFSDRun (its six optimizers, its schedulers as built
    for --start_epoch EPOCH, the epoch's lambdas, its train_step), and the outputs of that step's first forward
    (training.forward_networks on the same initial weights, in train mode, from the same RNG state). Returns {terms,
    outputs, accuracies, state, hyperparameters}, every value in DTYPE."""
    inputs, labels = fixture["inputs"].to(dtype), fixture["labels"]
    args = script_args(config, model_num, epoch)
    nets = networks(fixture, config, model_num, dtype)
    run = FFSDRun(detached_setup(Fast()), args, nets)
    run.on_epoch_start(epoch)
    values = run.train_step(0, inputs, labels)
    state = state_of_networks(nets.named_networks())
    forward = networks(fixture, config, model_num, dtype)
    forward.train()
    with torch.no_grad():
        leader_logits, leader_maps, trans_fusion, student_logits, student_maps, _, fusion_logits, fused = \
            training.forward_networks(forward, inputs)
    outputs = {f"student{i}_logits": z for i, z in enumerate(student_logits)}
    outputs.update({"leader_logits": leader_logits, "fusion_logits": fusion_logits,
                    "leader_trans_fusion_output_attention (mean_c x^2)": attention(trans_fusion),
                    "leader_trans_fusion_output[:2]": trans_fusion[:2],
                    "leader_last_feature_map": leader_maps[-1], "fused_feature_map(relu1_1)": fused,
                    "diversity_target(student0_last_map)": diversity_target(student_maps[0][-1])})
    outputs.update({f"student{i}_last_feature_map": maps[-1] for i, maps in enumerate(student_maps)})
    accuracies = {k: v for k, v in values.items() if k.endswith("/top1")}
    terms = {k: v for k, v in values.items() if k not in accuracies and k != "loss"}  # the step's loss terms
    hyper = {f"lambda_{k}": v for k, v in run.lambdas.items()}
    hyper["temperature"] = args.temperature
    return {"terms": terms, "outputs": outputs, "accuracies": accuracies, "state": state, "hyperparameters": hyper}


def loss_name(key):
    """A fixture loss key -> our term name ('leader/kl_to_fusion (T^2*KL)' -> 'leader/kl')."""
    name = key.split(" (")[0]
    return LOSS_NAMES.get(name, name).replace("sd_decoder_", "sd_")


def captured_value(step, key):
    """Our value for a key of real_step_capture_epoch<E> (what the released step fed to its meters)."""
    name = key.replace("sd_decoder_", "sd_")
    if name in CAPTURED_ACCURACIES or name.endswith("/acc"):
        return step["accuracies"].get(CAPTURED_ACCURACIES.get(name, name.replace("/acc", "/top1")))
    if re.fullmatch(r"student0/(diversity|self_distillation)", name):
        return 0.0  # student 0 has no such term; the released code logged 0
    return step["terms"].get(name)


def is_accuracy(key):
    return key.endswith("acc")


# --------------------------------------------------------------------------------------------------- items ----
def check_regeneration(report, fixture, config, seeded):
    """The scripts' seeded construction SEEDED (a state) against the stored initial weights, or against their
    un-rounded checksums when the stored ones are float16-rounded. Random draws have no float64 counterpart: ours64
    is our float32 draw itself, so the tolerance is the rule's floor."""
    name = f"init regeneration (seed {config['init_seed']})"
    exact = fixture.get("init_state_exact_checksums")
    if exact is not None:
        report.checksums(name + ", un-rounded checksums", seeded, exact, {k: v.double() for k, v in seeded.items()})
        return
    if config["weights_fp16_rounded"]:
        seeded = {k: v.half() if v.is_floating_point() else v for k, v in seeded.items()}
    stored = {f"{net}.{k}": v for net, state in fixture["init_state"].items() for k, v in state.items()}
    report.entries(name, {k: (seeded[k], stored[k], seeded[k]) for k in stored})


def check_values(report, name, ref, ours32, ours64, **rule):
    """REF {key: tensor or number} against our {key: value} (None where we produce none)."""
    missing = [k for k in ref if ours32.get(k) is None or ours64.get(k) is None]
    if missing:
        report.exact(name, False, f"{len(missing)} stored values not produced, e.g. {missing[:3]}")
        return
    report.entries(name, {k: (ours32[k], ref[k], ours64[k]) for k in ref}, **rule)


def check_step(report, fixture, epoch, losses_key, step32, step64):
    ref = fixture[losses_key]
    losses = [k for k in ref if k not in HYPERPARAMETERS]
    check_values(report, losses_key, {k: ref[k] for k in losses},
                 *({k: step["terms"].get(loss_name(k)) for k in losses} for step in (step32, step64)),
                 shared_spread=True)
    hyper = [k for k in HYPERPARAMETERS if k in ref]
    report.float64(f"losses_epoch{epoch} hyperparameters", [step64["hyperparameters"][k] for k in hyper],
                   [ref[k] for k in hyper], F64["loss"])

    capture = fixture.get(f"real_step_capture_epoch{epoch}")
    if capture is not None:
        terms = [k for k in capture if not is_accuracy(k)]
        check_values(report, f"real_step_capture_epoch{epoch}", {k: capture[k] for k in terms},
                     *({k: captured_value(step, k) for k in terms} for step in (step32, step64)), shared_spread=True)
        accuracies = [k for k in capture if is_accuracy(k)]  # percent of the batch: compared on the 0..100 scale
        check_values(report, f"real_step_capture_epoch{epoch} accuracies", {k: capture[k] for k in accuracies},
                     *({k: captured_value(step, k) for k in accuracies} for step in (step32, step64)), scale=100.0)

    checksums = fixture.get(f"post_step_checksums_epoch{epoch}")
    if checksums is not None:
        name = f"post_step_checksums_epoch{epoch}"
        report.equal(name + " keys", sorted(step32["state"]), sorted(checksums))
        report.checksums(name, step32["state"], checksums, step64["state"])


def float64_values(key, eval64, step):
    """Our float64 values for one `float64_reference` entry, by the entry's key; None for a key of no known form."""
    if key == "outputs_eval_mode_init":
        return eval64
    if step is None:
        return None
    if key == "outputs_train_mode":
        return step["outputs"]
    if key.startswith("post_step_checksums_epoch"):
        return step["state"]
    if EPOCH_KEY.match(key):
        return dict(step["hyperparameters"], **{k: v for k, v in step["terms"].items()})
    return None


def check_float64_reference(report, fixture, eval64, steps64):
    """`float64_reference` (where a fixture has one): any of outputs_eval_mode_init, outputs_train_mode,
    losses_epoch<E>_*, post_step_checksums_epoch<E>, in the float32 keys' forms, computed with networks, weights and
    input in float64; checked against our float64 run with common.parity's F64 tolerances, each value relative to
    its reference's largest magnitude (checksum fields: to our own tensor's size, as common.parity normalises them)."""
    for key, ref in (fixture.get("float64_reference") or {}).items():
        if key == "note":
            continue
        name = f"float64 {key}"
        epoch = re.search(r"epoch(\d+)", key)
        step = steps64.get(int(epoch.group(1))) if epoch else next(iter(steps64.values()), None)
        ours = float64_values(key, eval64, step)
        if ours is None:
            report.exact(name, False, "not a key of a form this checker reads, or its step did not run")
            continue
        checksums, losses = key.startswith("post_step_checksums_epoch"), EPOCH_KEY.match(key)
        values = {k: ours.get(loss_name(k) if losses and k not in HYPERPARAMETERS else k) for k in ref}
        missing = [k for k, v in values.items() if v is None]
        if missing:
            report.exact(name, False, f"{len(missing)} stored values not produced, e.g. {missing[:3]}")
            continue
        ours_n, ref_n = [], []
        for k, r in ref.items():
            if checksums:
                _, o, r = checksum_vectors(values[k], values[k], r)
            else:
                o, r = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (values[k], r))
                scale = max(float(r.abs().max()) if r.numel() else 0.0, 1e-300)
                o, r = o / scale, r / scale
            ours_n.append(o)
            ref_n.append(r)
        report.float64(name, ours_n, ref_n, F64["loss"] if losses else F64["output"], scale=1.0)


def check_fixture(path, args=None):
    fixture = load_fixture(path)
    missing = [k for k in ("inputs", "labels", "init_state", "outputs_eval_mode_init", "outputs_train_mode")
               if k not in fixture]
    if missing:
        raise FixtureError(f"{path} lacks {missing} (see SCHEMA.md, FFSD)")
    config = fixture_config(fixture)
    model_num = model_num_of(fixture["init_state"])
    epochs = sorted(((int(m.group(1)), k) for k in fixture for m in [EPOCH_KEY.match(k)] if m), reverse=True)
    report = Report(f"{getattr(path, 'name', path)}: {config['model']}, M = {model_num}, init seed "
                    f"{config['init_seed']}, epochs {[e for e, _ in epochs]}, float16 weights "
                    f"{bool(config['weights_fp16_rounded'])}")
    torch.manual_seed(config["init_seed"])
    seeded = training.build_networks(config["model"], "cifar100", model_num).named_networks()
    layout = {name: list(net.state_dict()) for name, net in seeded.items()}
    report.equal("init_state networks and keys", {name: list(s) for name, s in fixture["init_state"].items()}, layout)
    if not report.ok:
        return report
    if not getattr(args, "no_regeneration", False):
        check_regeneration(report, fixture, config, state_of_networks(seeded))

    eval32, eval64 = (eval_logits(fixture, config, model_num, dtype) for dtype in (torch.float32, torch.float64))
    check_values(report, "outputs_eval_mode_init", fixture["outputs_eval_mode_init"], eval32, eval64)
    steps64 = {}
    for epoch, losses_key in epochs:
        try:
            step32, step64 = (one_step(fixture, config, model_num, epoch, dtype)
                              for dtype in (torch.float32, torch.float64))
        except RuntimeError as e:  # a step that cannot run (e.g. a gradient sent into a freed graph) fails
            report.exact(f"train_step epoch {epoch}", False, f"{type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        if not steps64:  # the step's first forward does not depend on the epoch
            check_values(report, "outputs_train_mode", fixture["outputs_train_mode"], step32["outputs"],
                         step64["outputs"])
        steps64[epoch] = step64
        check_step(report, fixture, epoch, losses_key, step32, step64)
    check_float64_reference(report, fixture, eval64, steps64)
    return report


def add_arguments(parser):
    parser.add_argument("--no-regeneration", action="store_true",
                        help="skip the check that seeded construction regenerates the initial weights")


def main(argv=None):
    return checker_main("ffsd", check_fixture, __doc__, argv, add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
