"""The 1000 ImageNet-1k class names, in the standard class-index order (the sorted WordNet ids).

They ship with the package as ``imagenet_classes.txt`` (``synset<TAB>name``, one class per line, the
name the synset's first WordNet lemma, e.g. ``n11939491<TAB>daisy``), made from the data files of the
``timm`` wheel by ``tests/data/make_imagenet_classes.py``. Two pairs of classes share a name
(``crane``, ``maillot``); :func:`imagenet_synsets` tells them apart.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

CLASSES_FILE = "imagenet_classes.txt"
NUM_IMAGENET_CLASSES = 1000


@cache
def _rows() -> tuple[tuple[str, str], ...]:
    text = resources.files("paramtransfer.models").joinpath(CLASSES_FILE).read_text(encoding="utf-8")
    rows = tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line.strip())
    if len(rows) != NUM_IMAGENET_CLASSES or any(len(r) != 2 for r in rows):
        raise RuntimeError(f"paramtransfer's {CLASSES_FILE} is damaged; reinstall paramtransfer")
    return rows  # type: ignore[return-value]


def imagenet_classes() -> list[str]:
    """The names of the ImageNet-1k classes: ``imagenet_classes()[985] == "daisy"``."""
    return [name for _, name in _rows()]


def imagenet_synsets() -> list[str]:
    """The WordNet ids of the ImageNet-1k classes, in class-index order (``n01440764`` is class 0)."""
    return [synset for synset, _ in _rows()]
