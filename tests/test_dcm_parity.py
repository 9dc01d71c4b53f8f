"""dcm/parity.py: it can fail, and it reads any fixture of the schema.

Mutation tests: deliberately wrong variants of our own code, injected here by monkeypatching (weight decay off,
Nesterov on, one loss term's weight 1 % off, a KL temperature, the teacher's detach removed), must each fail the
checker on the shipped fixtures, on the items that see them. Other configurations: fixtures of SCHEMA.md section 1
written here from our own code (other depth, width, init seed, batch seed, class count, float16-rounded weights, the
MobileNet partner) must pass, and a wrong variant of each must fail.
"""
import copy

import pytest
import torch

from common.parity import FixtureError, checksum
from conftest import shared_file
from dcm import losses
from dcm import main as script
from dcm import parity
from dcm.convert import flat_to_wrn
from dcm.mobilenet import MobileNet
from dcm.resnet import WRN

pytestmark = pytest.mark.usefixtures("one_thread")


POST_STEP = ("net1 after one step", "net2 after one step", "loss after one step")


def post_step_checksum_items(report):
    return [i.name for i in report.items if i.name.startswith(POST_STEP[:2]) and "checksums" in i.name]


def pre_step_items(report):
    return [i.name for i in report.items if not i.name.startswith(POST_STEP)]


def patch(monkeypatch, name, replacement):
    """NAME replaced wherever dcm binds it: dcm.losses, and dcm.main, which imports the loss functions by name."""
    for module in (losses, script):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, replacement)


def weight_decay_off(monkeypatch):
    real = script.make_optimizer
    patch(monkeypatch, "make_optimizer", lambda params, lr, weight_decay: real(params, lr, 0.0))


def nesterov_on(monkeypatch):
    patch(monkeypatch, "make_optimizer", lambda params, lr, weight_decay: torch.optim.SGD(
        params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True))


def kl_weight_one_percent_off(monkeypatch):
    real = losses.total_loss
    patch(monkeypatch, "total_loss", lambda terms: real(terms) + 0.01 * terms[6])  # KL(n2.aux1 -> n1.aux1) x 1.01


def kl_temperature(monkeypatch):
    real = losses.smoothed_softmax
    patch(monkeypatch, "smoothed_softmax", lambda logits, eps=losses.EPSILON: real(logits / 1.1, eps))  # T 1 -> 1.1


def teacher_not_detached(monkeypatch):
    real = losses.loss_terms

    def loss_terms(*args, **kwargs):  # the teacher's .detach() is the only detach inside loss_terms
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "detach", lambda self: self)
            return real(*args, **kwargs)
    patch(monkeypatch, "loss_terms", loss_terms)


def assert_fails_after_the_step_only(report):
    failed = report.failed()
    assert set(post_step_checksum_items(report)) <= set(failed), report.format()
    assert not set(pre_step_items(report)) & set(failed), report.format()


@pytest.mark.parametrize("mutation", [weight_decay_off, nesterov_on, teacher_not_detached], ids=lambda f: f.__name__)
def test_mutated_optimizer_or_gradient_fails_the_post_step_items(mutation, monkeypatch):
    mutation(monkeypatch)
    assert_fails_after_the_step_only(parity.check_fixture(shared_file("dcm", "wrn-16-0.5_fixture.pt")))


def test_weight_decay_off_fails_the_mobilenet_fixture_despite_its_chaotic_first_step(monkeypatch):
    weight_decay_off(monkeypatch)
    report = parity.check_fixture(shared_file("dcm", "wrn-16-0.5_mobilenet_fixture.pt"))
    assert_fails_after_the_step_only(report)
    mobilenet = report.item(post_step_checksum_items(report)[1])
    assert "not comparable" in mobilenet.note  # its chaotic entries are set aside, the others still see 5e-5


def test_one_loss_term_weight_one_percent_off_fails_the_totals(monkeypatch):
    kl_weight_one_percent_off(monkeypatch)
    report = parity.check_fixture(shared_file("dcm", "wrn-16-0.5_fixture.pt"))
    failed = report.failed()
    assert {"train loss: total", "released test-path loss: total"} <= set(failed), report.format()
    assert "train loss: 24 terms" not in failed  # each term is right; their weighted sum is not


def test_kl_temperature_fails_the_loss_terms(monkeypatch):
    kl_temperature(monkeypatch)
    report = parity.check_fixture(shared_file("dcm", "wrn-16-0.5_fixture.pt"))
    assert {"train loss: 24 terms", "released test-path loss: 24 terms"} <= set(report.failed()), report.format()
    assert "logits net1, train-mode BN" not in report.failed()


# ---------------------------------------------------------------- fixtures of other configurations ----
def schema_checksum(t):
    c = checksum(t)
    return {"sum": c["sum"], "abs_sum": c["abs_sum"], "sq_sum": c["sq_sum"], "first": c["first"],
            "shape": list(t.shape)}


def write_fixture(path, depth=16, width=0.5, init_seed=0, num_classes=100, batch_seed=1, rounded=False,
                  partner="wrn"):
    """A fixture of SCHEMA.md section 1 made by our own code, as the authors' harness made theirs (spec section 7.3),
    its references computed in float32 on one thread: other reduction splits than the checker's own passes, as a
    fixture made on another machine would have."""
    mobile = partner == "mobilenet"
    net1 = WRN(depth, width, num_classes)
    net2 = None if mobile else WRN(depth, width, num_classes)
    torch.manual_seed(init_seed)
    fx = {"rng_state_before_net1": torch.get_rng_state()}
    net1.reset_parameters_as_released()
    fx["rng_state_before_mobilenet" if mobile else "rng_state_before_net2"] = torch.get_rng_state()
    net2 = MobileNet(num_classes) if mobile else net2.reset_parameters_as_released()
    fx["config"] = {"variant": "wrn_mobi (WRN vs MobileNet)" if mobile else "wrn (WRN vs WRN)", "depth": depth,
                    "width": float(width), "num_classes": num_classes, "init_seed": init_seed,
                    "init_order": "released", "input": f"torch.manual_seed({batch_seed}); randn, randint",
                    "optimizer": "SGD(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False)"}
    if rounded:
        fx["config"]["weights_fp16_rounded"] = True
    if batch_seed != 1:
        fx["config"]["batch_seed"] = batch_seed
    for label, net in (("net1", net1), ("net2", net2)):
        state = {k: v.clone() for k, v in parity.released_state(net).items()}
        if mobile and label == "net2":
            fx["net2_init_checksums"] = {k: schema_checksum(v) for k, v in state.items()}
            continue
        if rounded:
            fx[f"{label}_init_exact_checksums"] = {k: schema_checksum(v) for k, v in state.items()}
            state = {k: v.half() for k, v in state.items()}
            net.load_state_dict(flat_to_wrn({k: v.float() for k, v in state.items()}))
        fx[f"{label}_init"] = state
    torch.manual_seed(batch_seed)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, num_classes, (8,))
    fx.update(input=x, target=y, output_order="[aux1, aux2, final]")
    options = script.get_args_parser().parse_args(["--depth", str(depth), "--width", str(width), "--net2", partner,
                                                   "--device", "cpu"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = parity.compute([net1, net2], x, y, options, torch.float32)
    finally:
        torch.set_num_threads(threads)
    evals = {"net1": r["out_eval"][0]}
    if mobile:
        evals.update({"net2_true_eval_mode": r["out_eval"][1],
                      "net2_as_original_test_path (MobileNet stays in train mode)": r["out_released_test"]})
    else:
        evals["net2"] = r["out_eval"][1]
    fx.update(outputs_train_mode={"net1": r["out_train"][0], "net2": r["out_train"][1]}, outputs_eval_mode=evals,
              loss_term_names=losses.term_names(r["out_train"]),
              loss_terms_train=[t.item() for t in r["terms_train"]],
              loss_train=losses.total_loss(r["terms_train"]).item(),
              loss_terms_test_path_init=[t.item() for t in r["terms_test"]],
              loss_test_path_init=losses.total_loss(r["terms_test"]).item(),
              description="written by tests/test_dcm_parity.py from dcm/ itself", torch_version=torch.__version__)
    fx["after_one_sgd_step"] = {"loss_train_same_batch": losses.total_loss(r["terms_after"]).item(),
                                "loss_terms": [t.item() for t in r["terms_after"]],
                                "net1_checksums": {k: schema_checksum(v) for k, v in r["after"][0].items()},
                                "net2_checksums": {k: schema_checksum(v) for k, v in r["after"][1].items()}}
    torch.save(fx, path)
    return path


def test_wrn_pair_of_another_depth_width_seed_batch_and_class_count(tmp_path, capsys):
    path = write_fixture(tmp_path / "wrn-22-0.25_c10_fixture.pt", depth=22, width=0.25, init_seed=7, num_classes=10,
                         batch_seed=3)
    report = parity.check_fixture(path)
    assert report.ok and not report.not_comparable(), report.format()
    assert "WRN-22-0.25 | WRN, 10 classes, init seed 7, batch seed 3" in report.title
    assert parity.main([str(path)]) == 0 and "1/1 fixtures match" in capsys.readouterr().out


def test_wrn_pair_of_another_configuration_fails_with_nesterov(tmp_path, monkeypatch):
    path = write_fixture(tmp_path / "wrn-22-0.25_c10_fixture.pt", depth=22, width=0.25, init_seed=7, num_classes=10,
                         batch_seed=3)
    nesterov_on(monkeypatch)
    assert_fails_after_the_step_only(parity.check_fixture(path))


def test_float16_rounded_pair_and_its_exact_checksums(tmp_path):
    path = write_fixture(tmp_path / "wrn-16-1_fp16_fixture.pt", width=1.0, init_seed=3, rounded=True)
    report = parity.check_fixture(path)
    assert report.ok and not report.not_comparable(), report.format()
    names = [i.name for i in report.items]
    assert "net1 initial weights regenerated (float16-rounded) = stored, bit for bit" in names
    assert "net2 un-rounded initial weights regenerated = stored checksums" in names
    fx = torch.load(path, weights_only=False)
    key = "group1.block0.conv0"
    fx["net2_init_exact_checksums"][key]["sq_sum"] *= 1 + 1e-6  # as if one weight were drawn differently
    fx["net1_init"]["fc.weight"].view(-1).view(torch.int16)[0] += 1  # one float16 step on one weight
    torch.save(fx, path)
    failed = parity.check_fixture(path).failed()
    assert "net2 un-rounded initial weights regenerated = stored checksums" in failed
    assert "net1 initial weights regenerated (float16-rounded) = stored, bit for bit" in failed


@pytest.fixture(scope="module")
def mobilenet_c10_fixture(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("dcm") / "wrn-16-0.5_mobilenet_c10_fixture.pt", init_seed=2,
                         num_classes=10, batch_seed=5, partner="mobilenet")


def test_mobilenet_partner_of_another_seed_batch_and_class_count(mobilenet_c10_fixture):
    report = parity.check_fixture(mobilenet_c10_fixture)
    assert report.ok, report.format()
    assert "WRN-16-0.5 | MobileNet, 10 classes, init seed 2, batch seed 5" in report.title
    assert not set(pre_step_items(report)) & set(report.not_comparable()), report.format()


@pytest.mark.slow
def test_mobilenet_partner_of_another_configuration_fails_without_weight_decay(mobilenet_c10_fixture, monkeypatch):
    weight_decay_off(monkeypatch)  # the shipped MobileNet fixture is checked the same way in the default suite
    assert_fails_after_the_step_only(parity.check_fixture(mobilenet_c10_fixture))


def test_fixtures_off_the_schema_or_off_the_script_are_refused(tmp_path):
    path = write_fixture(tmp_path / "wrn-16-0.25_fixture.pt", width=0.25)
    fx = torch.load(path, weights_only=False)
    for change, message in ((lambda f: f.pop("after_one_sgd_step"), "missing keys"),
                            (lambda f: f["config"].update(depth=10), "does not run"),
                            (lambda f: f["config"].update(variant="wrn_mobi (WRN vs MobileNet)"), "net2_init")):
        broken = copy.deepcopy(fx)
        change(broken)
        torch.save(broken, tmp_path / "broken_fixture.pt")
        with pytest.raises(FixtureError, match=message):
            parity.check_fixture(tmp_path / "broken_fixture.pt")
    assert parity.main([str(tmp_path / "absent_fixture.pt")]) == 1
