"""Task specs, dataset readers, seeded few-shot splits.

May import: errors.
"""

from paramtransfer.data.pipeline import Augment, InputSpec, fit_shape, to_input
from paramtransfer.data.specs import TaskSpec, parse_spec
from paramtransfer.data.task import Split, Task, load_task

__all__ = [
    "Augment",
    "InputSpec",
    "Split",
    "Task",
    "TaskSpec",
    "fit_shape",
    "load_task",
    "parse_spec",
    "to_input",
]
