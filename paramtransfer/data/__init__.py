"""Task specs, dataset readers, seeded few-shot splits.

May import: errors.
"""

from paramtransfer.data.specs import TaskSpec, parse_spec
from paramtransfer.data.task import Split, Task, fit_shape, load_task

__all__ = ["Split", "Task", "TaskSpec", "fit_shape", "load_task", "parse_spec"]
