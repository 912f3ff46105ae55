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
    # "auto" means the CPU in the suite (its checks compare with CPU tensors); tests marked gpu ask for cuda
    os.environ["PARAMTRANSFER_DEVICE"] = "cpu"
    # two threads (this machine's cores) unless OMP_NUM_THREADS asks for fewer, e.g. beside a benchmark:
    # OpenMP threads that outnumber the free cores spin-wait and slow every process on the machine
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(wanted) if wanted.isdigit() and int(wanted) > 0 else 2)
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
def tiny_rnn_source() -> pt.LayeredNet:
    """A small recurrent source (GRU over image rows)."""
    return pt.build_model("rnn", num_classes=5, seed=123, hidden=8)


@pytest.fixture(scope="session")
def tiny_resnet_source() -> pt.LayeredNet:
    """A narrow ResNet-20 as a source, to exercise BatchNorm."""
    return pt.build_model("resnet20", num_classes=5, seed=123, width=4)


@pytest.fixture(scope="session")
def tiny_effnet_source() -> pt.LayeredNet:
    """EfficientNet-Lite0 (full width, random weights) at a tiny grey 28x28 input: MBConv blocks with and
    without identity shortcuts, ReLU6, TF-style padding, dropout before the head."""
    net = pt.build_model("efficientnet_lite0", num_classes=5, in_shape=(1, 28, 28), seed=123)
    # BatchNorm statistics of the inputs, as a trained source has them: with the initial ones (0, 1) the
    # random blocks' activations grow with depth until a PTU's tanh saturates and passes no gradient
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None  # a cumulative average over the calibration batches
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.train()
        for _ in range(4):
            net(torch.rand(32, 1, 28, 28, generator=generator))
    for m in norms:
        m.momentum = 0.1
    return net.eval()


class _UserNet(torch.nn.Module):
    """A model written without paramtransfer in mind (in-place ReLU after a block, BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 5)
        self.act = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Sequential(
            torch.nn.Conv2d(4, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten()
        )
        self.classifier = torch.nn.Sequential(torch.nn.Dropout(0.0), torch.nn.Linear(8 * 11 * 11, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv2(self.act(self.conv1(x))))


@pytest.fixture(scope="session")
def tiny_wrapped_source() -> pt.LayeredNet:
    """A user's model seen as a LayeredNet through LayeredNet.wrap (hooks, no rewriting)."""
    torch.manual_seed(5)
    return pt.LayeredNet.wrap(_UserNet(), blocks=["conv1", "conv2"], head="classifier.1")


class _StemNet(torch.nn.Module):
    """A user's model with parts that are neither a named block nor the head: an un-named stem (conv +
    BatchNorm) before the first block, an un-named BatchNorm between the blocks and a parameter of the
    model itself (a scale before the head); block ``conv1`` holds a BatchNorm without affine parameters."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.scale = nn.Parameter(torch.ones(1))
        self.conv1 = nn.Sequential(
            nn.Conv2d(4, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4, affine=False), nn.ReLU()
        )
        self.between = nn.BatchNorm2d(4)
        self.conv2 = nn.Sequential(
            nn.Conv2d(4, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten()
        )
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(8 * 6 * 6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv2(self.between(self.conv1(self.stem(x)))) * self.scale)


@pytest.fixture(scope="session")
def tiny_stem_wrapped_source() -> pt.LayeredNet:
    """A wrapped user's model whose stem, in-between BatchNorm and own parameter are not named blocks."""
    torch.manual_seed(6)
    net = pt.LayeredNet.wrap(_StemNet(), blocks=["conv1", "conv2"], head="classifier.1")
    with torch.no_grad():  # source-like BatchNorm statistics, so that a moved statistic is visible
        net.train()
        net(torch.randn(64, 1, 28, 28))
    return net
