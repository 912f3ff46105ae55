"""LayeredNet, the model zoo and the source store."""

from paramtransfer.models.layered import LayeredNet, WrappedNet
from paramtransfer.models.store import load_model, pretrain, save_model
from paramtransfer.models.zoo import build_model, list_models

__all__ = ["LayeredNet", "WrappedNet", "build_model", "list_models", "load_model", "pretrain", "save_model"]
