"""Task spec strings: ``fashion[0-4]``, ``fashion``, ``digits[0-4]``, ``folder:PATH``, ``npz:PATH``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from paramtransfer.errors import UserError

_NAMED = re.compile(r"^(?P<name>[a-z_]+)(?:\[(?P<sel>[^\]]*)\])?$")
KNOWN_DATASETS = ("fashion", "digits")


@dataclass(frozen=True)
class TaskSpec:
    """A parsed task spec: a dataset (or a user path) and an optional class selection."""

    dataset: str  # "fashion" | "digits" | "folder" | "npz"
    classes: tuple[int, ...] | None = None  # indices into the dataset's classes, in label order
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.dataset}:{self.path}"
        if self.classes is None:
            return self.dataset
        return f"{self.dataset}[{_format_selection(self.classes)}]"


def _format_selection(classes: tuple[int, ...]) -> str:
    if len(classes) > 1 and list(classes) == list(range(classes[0], classes[-1] + 1)):
        return f"{classes[0]}-{classes[-1]}"
    return ",".join(str(c) for c in classes)


def _parse_selection(sel: str, spec: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in sel.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise UserError(f"class range {part!r} in {spec!r} is empty; write it low-high, e.g. [0-4]")
            out.extend(range(lo, hi + 1))
        elif part.isdigit():
            out.append(int(part))
        else:
            raise UserError(f"cannot read class selection {sel!r} in {spec!r}; use e.g. [0-4] or [0,3,7]")
    if len(set(out)) != len(out):
        raise UserError(f"class selection in {spec!r} names a class twice")
    return tuple(out)


def parse_spec(spec: str) -> TaskSpec:
    """Parse a task spec string.

    Example:
        >>> parse_spec("fashion[5-9]")
        TaskSpec(dataset='fashion', classes=(5, 6, 7, 8, 9), path=None)
    """
    spec = spec.strip()
    for prefix in ("folder", "npz"):
        if spec.startswith(prefix + ":"):
            path = spec[len(prefix) + 1 :]
            if not path:
                raise UserError(f"{prefix}: needs a path, e.g. {prefix}:/data/my_task")
            return TaskSpec(prefix, None, path)
    m = _NAMED.match(spec)
    if not m or m.group("name") not in KNOWN_DATASETS:
        raise UserError(
            f"unknown task spec {spec!r}; use fashion, fashion[0-4], digits, digits[0-4], "
            "folder:PATH or npz:PATH"
        )
    sel = m.group("sel")
    return TaskSpec(m.group("name"), None if sel is None else _parse_selection(sel, spec))
