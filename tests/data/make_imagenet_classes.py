"""Make ``paramtransfer/models/imagenet_classes.txt``: the 1000 ImageNet-1k classes, one per line, in the
standard class-index order, as ``synset<TAB>name``.

Where the data comes from: nothing we install ships the ImageNet class names, but the ``timm`` wheel
(PyTorch Image Models, Apache-2.0; the names are WordNet's lemmas) carries them as data files:
``timm/data/_info/imagenet_synsets.txt`` (the 1000 WordNet ids of ImageNet-1k) and
``timm/data/_info/imagenet_synset_to_lemma.txt`` (``synset<TAB>lemma, lemma, ...`` for all of WordNet's
ImageNet synsets). The class index of a synset is its position among the sorted ids (the order of
torchvision's ``ImageFolder`` on the ILSVRC-2012 training folders, which every ImageNet-1k checkpoint
uses); the name is the synset's first lemma, as WordNet writes it (``bell cote``, ``daisy``; two
synsets share the lemma ``crane``, two ``maillot``).

Run (the wheel is read as a zip file; timm is not installed or imported)::

    pip download --no-deps timm -d /tmp/timm
    python tests/data/make_imagenet_classes.py /tmp/timm/timm-*.whl

Made from timm 1.0.31.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

SYNSETS = "timm/data/_info/imagenet_synsets.txt"
LEMMAS = "timm/data/_info/imagenet_synset_to_lemma.txt"
OUT = Path(__file__).resolve().parents[2] / "paramtransfer" / "models" / "imagenet_classes.txt"


def classes(wheel: Path) -> list[tuple[str, str]]:
    """``(synset, first lemma)`` of the 1000 ImageNet-1k classes, in class-index order."""
    with zipfile.ZipFile(wheel) as z:
        synsets = z.read(SYNSETS).decode().split()
        lemmas = {}
        for line in z.read(LEMMAS).decode().splitlines():
            synset, _, names = line.partition("\t")
            lemmas[synset] = names.split(",")[0].strip()
    if len(synsets) != 1000 or len(set(synsets)) != 1000:
        raise SystemExit(f"{wheel}: {SYNSETS} does not hold 1000 distinct synsets")
    missing = [s for s in synsets if not lemmas.get(s)]
    if missing:
        raise SystemExit(f"{wheel}: no lemma for {missing[0]} in {LEMMAS}")
    return [(s, lemmas[s]) for s in sorted(synsets)]


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: make_imagenet_classes.py TIMM_WHEEL")
    rows = classes(Path(argv[0]))
    OUT.write_text("".join(f"{s}\t{n}\n" for s, n in rows))
    print(f"wrote {OUT}: {len(rows)} classes, from {rows[0]} to {rows[-1]}")


if __name__ == "__main__":
    main(sys.argv[1:])
