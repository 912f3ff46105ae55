"""Shared fixtures: tiny real tasks and a small source net, so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

import paramtransfer as pt


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory: pytest.TempPathFactory):
    """Cached sources go to a temporary PARAMTRANSFER_HOME, never to the user's cache."""
    old = os.environ.get("PARAMTRANSFER_HOME")
    os.environ["PARAMTRANSFER_HOME"] = str(tmp_path_factory.mktemp("pt_home"))
    torch.set_num_threads(2)
    yield
    if old is None:
        os.environ.pop("PARAMTRANSFER_HOME", None)
    else:
        os.environ["PARAMTRANSFER_HOME"] = old


@pytest.fixture(scope="session")
def tiny_task() -> pt.Task:
    """Fashion-MNIST [5-9], 4 shots and 4 validation examples per class, 60 test images."""
    return pt.load_task("fashion[5-9]", shots=4, seed=0, val_shots=4, test_limit=60)


@pytest.fixture(scope="session")
def tiny_source() -> pt.LayeredNet:
    """A small LeNet as a source (random weights: the tests check mechanics, not accuracy)."""
    return pt.build_model("lenet", num_classes=5, seed=123, width=4, hidden=16)


@pytest.fixture(scope="session")
def tiny_resnet_source() -> pt.LayeredNet:
    """A narrow ResNet-20 as a source, to exercise BatchNorm."""
    return pt.build_model("resnet20", num_classes=5, seed=123, width=4)
