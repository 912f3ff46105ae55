"""LayeredNet, the model zoo and the source store (save, load, key; it never trains: pretraining a source
is :mod:`paramtransfer.experiments.pretrain`).

May import: errors, registry, data, train.checkpoint.
"""

from paramtransfer.models.classnames import imagenet_classes
from paramtransfer.models.imagenet import pretrained
from paramtransfer.models.layered import LayeredNet, WrappedNet
from paramtransfer.models.store import load_model, save_model
from paramtransfer.models.tvmodels import convert_torchvision
from paramtransfer.models.zoo import build_model, list_models

__all__ = [
    "LayeredNet",
    "WrappedNet",
    "build_model",
    "convert_torchvision",
    "imagenet_classes",
    "list_models",
    "load_model",
    "pretrained",
    "save_model",
]
