"""Shared test fixtures: synthetic data in the real on-disk formats, the paper fixtures folder, opt-in slow tests."""
import os
import pathlib

import pytest

from common.synthetic import write_cifar, write_imagefolder

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A folder with synthetic cifar-10-batches-py/, cifar-100-python/ and imagenet/{train,val}/."""
    root = tmp_path_factory.mktemp("synthetic")
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100")
    write_imagefolder(os.path.join(root, "imagenet"))
    return root


def paper_fixtures(paper, pattern="*_fixture.pt"):
    """Fixture files of one paper; the caller skips when the shared folder is absent."""
    folder = SHARED_FIXTURES / paper
    if not folder.is_dir():
        return folder, []
    return folder, sorted(p for p in folder.glob(pattern) if "_fixture_" not in p.name or p.name.endswith("_fixture.pt"))
