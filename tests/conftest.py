"""Shared test fixtures: synthetic data in the real on-disk formats, the authors' fixtures, opt-in slow tests.

The authors' fixtures come from one root (common.parity.fixtures_root: --fixtures-root, else $OKD_FIXTURES, else
../shared/fixtures). A test takes them through arguments named after the paper:

    def test_x(dcm_fixture): ...        # one run per <root>/dcm/*_fixture.pt
    def test_y(mcl_fingerprint): ...    # one run per <root>/mcl/*.json
    def test_z(): path = shared_file("okddip", "resnet32.json")   # one named file

When a paper's folder is absent, each such test is skipped and the session ends with one line saying which folder
is missing, so a parity suite that did not run never looks like one that passed.
"""
import os
import pathlib

import pytest
import torch

from common.parity import ENV_VAR, fingerprint_files, fixture_files, fixtures_root
from common.synthetic import write_cifar, write_imagefolder

REPO = pathlib.Path(__file__).resolve().parent.parent
PAPERS = ("dcm", "ffsd", "okddip", "mcl")
_missing = set()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
    parser.addoption("--fixtures-root", default=None,
                     help=f"folder holding the authors' <paper>/ fixture folders (default: ${ENV_VAR}, else "
                          f"../shared/fixtures)")


def pytest_configure(config):
    root = config.getoption("--fixtures-root")
    if root:  # the checkers called by the tests read the same root
        os.environ[ENV_VAR] = str(pathlib.Path(root).resolve())


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _params(paper, files):
    if files:
        return [pytest.param(p, id=p.name) for p in files]
    folder = fixtures_root() / paper
    _missing.add(folder)
    return [pytest.param(None, id="missing", marks=pytest.mark.skip(reason=f"no fixtures in {folder}"))]


def pytest_generate_tests(metafunc):
    for paper in PAPERS:
        if f"{paper}_fixture" in metafunc.fixturenames:
            metafunc.parametrize(f"{paper}_fixture", _params(paper, fixture_files(paper)))
        if f"{paper}_fingerprint" in metafunc.fixturenames:
            metafunc.parametrize(f"{paper}_fingerprint", _params(paper, fingerprint_files(paper)))


def shared_file(paper, name):
    """<fixtures root>/<paper>/<name>; skips the calling test (and says so at the end) when it is absent."""
    path = fixtures_root() / paper / name
    if not path.is_file():
        _missing.add(path)
        pytest.skip(f"{path} is absent")
    return path


def pytest_terminal_summary(terminalreporter):
    if _missing:
        terminalreporter.write_line(
            "authors' fixtures missing (their parity tests were skipped): " + ", ".join(sorted(map(str, _missing))),
            yellow=True, bold=True)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (use with pytestmark = pytest.mark.usefixtures("one_thread")): the small
    batches of the tests train as fast on one thread as on two and much faster on a shared 2-core machine, the
    checkers' float32 rounding does not depend on the thread count, every run of a module (an uninterrupted one and
    the killed and resumed ones) computes with the same kernels, and a process forked from one that ran OpenMP teams
    can hang in its first parallel region."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A folder with synthetic cifar-10-batches-py/, cifar-100-python/ and imagenet/{train,val}/."""
    root = tmp_path_factory.mktemp("synthetic")
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100")
    write_imagefolder(os.path.join(root, "imagenet"))
    return root


def assert_same_training_with_less_memory(in_place, out_of_place):
    """IN_PLACE and OUT_OF_PLACE are (state dict after the steps, logged values, MB allocated by the last step) of
    the same steps with and without in-place activations: the same bits, less memory asked for."""
    (new_state, new_logged, new_mb), (old_state, old_logged, old_mb) = in_place, out_of_place
    assert new_state.keys() == old_state.keys() and all(torch.equal(new_state[k], old_state[k]) for k in new_state)
    assert new_logged == old_logged
    assert new_mb < old_mb, (new_mb, old_mb)
