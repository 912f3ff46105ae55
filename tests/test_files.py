"""Image folders streamed from disk (``ImageFiles``) against the same folders held in memory."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from paramtransfer.data import load_task
from paramtransfer.data.files import ImageFiles
from paramtransfer.data.sources import load_folder
from paramtransfer.errors import UserError
from paramtransfer.experiments.run import train_model

TINY_MB = 1e-6  # about one byte: every folder streams


def _noise(rng: np.random.Generator, h: int, w: int, channels: int) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _folder(root: Path, per_class: int = 9) -> Path:
    """Two classes of noise images in two sizes: ``cat`` RGB PNGs of 12x10 (the first image: the common
    size) and grey PNGs of 7x9, ``dog`` RGB JPEGs of 9x14."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    for i in range(per_class):
        if i % 3 == 2:
            Image.fromarray(_noise(rng, 7, 9, 1), "L").save(root / "cat" / f"{i:02d}.png")
        else:
            Image.fromarray(_noise(rng, 10, 12, 3), "RGB").save(root / "cat" / f"{i:02d}.png")
        Image.fromarray(_noise(rng, 14, 9, 3), "RGB").save(root / "dog" / f"{i:02d}.jpg", quality=90)
    return root


def _truncated_jpeg() -> bytes:
    """A JPEG whose header is whole but whose pixel data stop half way."""
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "JPEG")
    data = buf.getvalue()
    scan = data.index(b"\xff\xda")  # start of scan: the header ends here
    return data[: scan + (len(data) - scan) // 2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("files") / "imgs")


def test_a_folder_above_the_budget_streams_with_the_same_pixels(folder: Path) -> None:
    held, streamed = load_folder(str(folder)), load_folder(str(folder), memory_mb=TINY_MB)
    assert isinstance(held.x, torch.Tensor) and isinstance(streamed.x, ImageFiles)
    assert streamed.x.shape == held.x.shape == (18, 3, 10, 12)
    assert streamed.x.dtype == held.x.dtype == torch.uint8
    assert torch.equal(streamed.x.load(), held.x)
    assert torch.equal(streamed.y, held.y) and streamed.classes == held.classes == ("cat", "dog")
    # the grey PNGs are repeated to RGB, resized to the first image's 10x12 like every other image
    grey = held.x[2]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_the_budget_is_the_decoded_size_in_mib(folder: Path) -> None:
    size_mb = 18 * 3 * 10 * 12 / 2**20  # N*C*H*W bytes, from the headers
    assert isinstance(load_folder(str(folder), memory_mb=size_mb).x, torch.Tensor)
    assert isinstance(load_folder(str(folder), memory_mb=size_mb * 0.999).x, ImageFiles)


def test_folders_are_stored_as_uint8(folder: Path) -> None:
    for memory_mb in (2048, TINY_MB):
        task = load_task(f"folder:{folder}", shots=2, seed=0, memory_mb=memory_mb)
        for split in (task.train, task.val, task.test):
            assert split.images.dtype == torch.uint8
    assert load_task(f"folder:{folder}", shots=2, seed=0).train.images.dtype == torch.uint8


def test_streamed_and_in_memory_tasks_are_identical(folder: Path) -> None:
    spec = f"folder:{folder}"
    held = load_task(spec, shots=2, seed=3, in_shape=(3, 16, 16))
    streamed = load_task(spec, shots=2, seed=3, in_shape=(3, 16, 16), memory_mb=TINY_MB)
    assert streamed.in_shape == held.in_shape == (3, 16, 16)
    for name in ("train", "val", "test"):
        a, b = getattr(held, name), getattr(streamed, name)
        assert not a.streamed and b.streamed
        assert torch.equal(a.y, b.y)
        assert torch.equal(a.inputs(), b.inputs())  # ImageFiles.load
        rows = torch.tensor([len(a) - 1, 0])
        assert torch.equal(a.inputs(rows), b.inputs(rows))
        chunks_a, chunks_b = list(a.chunks(3)), list(b.chunks(3))  # b: ImageFiles.stream
        assert len(chunks_a) == len(chunks_b) == -(-len(a) // 3)
        for (xa, ya), (xb, yb) in zip(chunks_a, chunks_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("augment", [False, True])
def test_a_streamed_training_run_equals_the_in_memory_one(folder: Path, augment: bool) -> None:
    def run(memory_mb: float | None):
        result, _ = train_model(
            "scratch",
            source=None,
            arch="lenet",
            target=f"folder:{folder}",
            shots=2,
            epochs=2,
            seed=0,
            memory_mb=memory_mb,
            train_options={"batch_size": 2, "augment": augment},
        )
        return result

    held, streamed = run(None), run(TINY_MB)
    losses = [[r["train_loss"], r["val_loss"]] for r in held.history]
    assert losses == [[r["train_loss"], r["val_loss"]] for r in streamed.history]
    assert len(losses) == 2 and all(np.isfinite(losses).flatten())
    assert held.test_accuracy == streamed.test_accuracy
    assert held.fingerprint == streamed.fingerprint  # where images come from is not the run's identity
    assert "memory_mb" not in held.config["data"] and "memory_mb" not in streamed.config["data"]


def test_batches_do_not_depend_on_the_number_of_workers(folder: Path) -> None:
    files = load_folder(str(folder), memory_mb=TINY_MB).x
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(1))
    order = [perm[:5], perm[5:6], perm[6:13], perm[13:]]
    alone = list(files.stream(order, workers=0))
    shared = list(files.stream(order, workers=2))
    assert [tuple(b.shape) for b in alone] == [(5, 3, 10, 12), (1, 3, 10, 12), (7, 3, 10, 12), (5, 3, 10, 12)]
    for idx, a, b in zip(order, alone, shared, strict=True):
        assert a.dtype == b.dtype == torch.uint8
        assert torch.equal(a, b) and torch.equal(a, files[idx].load())


def test_image_files_index_like_a_tensor(folder: Path) -> None:
    files = load_folder(str(folder), memory_mb=TINY_MB).x
    full = files.load()
    assert len(files) == 18 and files.shape == (18, 3, 10, 12)
    picks = {
        "tensor": torch.tensor([4, 0, 17]),
        "list": [4, 0, 17],
        "slice": slice(3, 9, 2),
        "mask": torch.arange(18) % 4 == 1,
        "empty": torch.tensor([], dtype=torch.int64),
    }
    for name, idx in picks.items():
        part = files[idx]
        assert isinstance(part, ImageFiles), name
        assert torch.equal(part.load(), full[idx]), name
    assert torch.equal(files[torch.tensor([5, 6, 7])][1:].load(), full[6:8])


def test_a_file_corrupt_past_its_header_fails_when_its_batch_is_read(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", per_class=4)
    bad = root / "dog" / "02.jpg"
    bad.write_bytes(_truncated_jpeg())
    with pytest.raises(UserError, match="remove or fix it") as err:  # in memory: found at load
        load_folder(str(root))
    assert str(bad) in str(err.value)
    files = load_folder(str(root), memory_mb=TINY_MB).x  # streamed: its header is whole, it loads
    row = files.paths.index(str(bad))
    for workers in (0, 2):
        with pytest.raises(UserError) as err:
            list(files.stream([torch.arange(len(files))], workers=workers))
        msg = str(err.value)
        assert type(err.value) is UserError and str(bad) in msg and "remove or fix it" in msg, msg
        assert "\n" not in msg and "DataLoader" not in msg, msg
    good = [torch.tensor([i]) for i in range(len(files)) if i != row]
    assert len(list(files.stream(good, workers=2))) == len(files) - 1
    with pytest.raises(UserError, match="02.jpg"):
        files[[row]].load()


def test_a_streamed_folder_checks_every_header_at_load(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", per_class=4)
    (root / "cat" / "notes.png").write_bytes(b"not a picture")
    with pytest.raises(UserError, match="notes.png is not a readable image"):
        load_folder(str(root), memory_mb=TINY_MB)


@pytest.mark.parametrize("memory_mb", [0, -1, -0.5, "lots", "512", None, True, float("nan"), float("inf")])
def test_memory_mb_must_be_a_positive_number(folder: Path, memory_mb: object) -> None:
    with pytest.raises(UserError, match="memory_mb") as err:
        load_task(f"folder:{folder}", shots=2, memory_mb=memory_mb)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="memory_mb"):
        load_folder(str(folder), memory_mb=memory_mb)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="memory_mb"):  # any dataset: a bad budget is never ignored
        load_task("digits[0-1]", shots=2, memory_mb=memory_mb)  # type: ignore[arg-type]
