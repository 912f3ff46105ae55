"""paramtransfer: learn how and from where to transfer a source network's parameters.

Example:
    >>> import paramtransfer as pt
    >>> task = pt.load_task("fashion[5-9]", shots=20, seed=0)
    >>> src = pt.pretrain("lenet", "fashion[0-4]", epochs=3, seed=0)
    >>> res = pt.run("finetune", source=src, target=task, lr=0.01, epochs=30, seed=0)
"""

from paramtransfer import methods as _methods  # noqa: F401  (registers every method)
from paramtransfer.data import Task, load_task
from paramtransfer.errors import UserError
from paramtransfer.experiments.pretrain import pretrain, resolve_source
from paramtransfer.experiments.run import run
from paramtransfer.methods.base import list_methods, make_method
from paramtransfer.models import LayeredNet, build_model, list_models, load_model, pretrained, save_model
from paramtransfer.results import RunResult
from paramtransfer.train import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "LayeredNet",
    "RunResult",
    "Task",
    "TrainConfig",
    "UserError",
    "build_model",
    "list_methods",
    "list_models",
    "load_model",
    "load_task",
    "make_method",
    "pretrain",
    "pretrained",
    "resolve_source",
    "run",
    "save_model",
]
