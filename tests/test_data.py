"""Task specs, dataset readers, seeded few-shot splits (paramtransfer.data)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import paramtransfer as pt
from paramtransfer.data import TaskSpec, fit_shape, load_task, parse_spec, sources
from paramtransfer.errors import UserError

FASHION_DIR = Path(sources.DEBIAN_FASHION_DIR)
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed"
)


def _rows(x: torch.Tensor) -> set[bytes]:
    """Each image as bytes, to compare splits image by image."""
    return {r.tobytes() for r in x.flatten(1).numpy()}


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """Undo the model-input normalisation ((v/255 - 0.5) / 0.5) of 8-bit images."""
    return np.rint((x.numpy() * 0.5 + 0.5) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("fashion", TaskSpec("fashion", None, None)),
        ("fashion[0-4]", TaskSpec("fashion", (0, 1, 2, 3, 4))),
        ("fashion[5-9]", TaskSpec("fashion", (5, 6, 7, 8, 9))),
        ("fashion[0,3,7]", TaskSpec("fashion", (0, 3, 7))),
        ("fashion[7,3]", TaskSpec("fashion", (7, 3))),
        ("fashion[0-1,5]", TaskSpec("fashion", (0, 1, 5))),
        ("fashion[ 2 - 3 ]", TaskSpec("fashion", (2, 3))),
        ("digits", TaskSpec("digits", None)),
        ("digits[0-4]", TaskSpec("digits", (0, 1, 2, 3, 4))),
        ("  digits[6]  ", TaskSpec("digits", (6,))),
        ("folder:/data/my task", TaskSpec("folder", None, "/data/my task")),
        ("npz:rel/arrays.npz", TaskSpec("npz", None, "rel/arrays.npz")),
    ],
)
def test_parse_spec(spec: str, expected: TaskSpec) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("fashion", "fashion"),
        ("fashion[0-4]", "fashion[0-4]"),
        ("fashion[0,1,2]", "fashion[0-2]"),
        ("fashion[0,3,7]", "fashion[0,3,7]"),
        ("fashion[7,3]", "fashion[7,3]"),
        ("fashion[4]", "fashion[4]"),
        ("digits[0-4]", "digits[0-4]"),
        ("folder:/x/y", "folder:/x/y"),
        ("npz:/x/y.npz", "npz:/x/y.npz"),
    ],
)
def test_spec_str_is_canonical_and_round_trips(spec: str, text: str) -> None:
    assert str(parse_spec(spec)) == text
    assert parse_spec(text) == parse_spec(spec)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("mnist", "unknown task spec"),
        ("Fashion", "unknown task spec"),
        ("fashion[0-4", "unknown task spec"),
        ("fashion(0-4)", "unknown task spec"),
        ("", "unknown task spec"),
        ("fashion[]", "cannot read class selection"),
        ("fashion[a-b]", "cannot read class selection"),
        ("fashion[-1]", "cannot read class selection"),
        ("fashion[0-4;7]", "cannot read class selection"),
        ("fashion[4-2]", "is empty"),
        ("fashion[1,1]", "twice"),
        ("fashion[0-3,2]", "twice"),
        ("folder:", "needs a path"),
        ("npz:", "needs a path"),
    ],
)
def test_bad_specs_raise_user_error(spec: str, fragment: str) -> None:
    with pytest.raises(UserError) as err:
        parse_spec(spec)
    assert fragment in str(err.value)


def test_unknown_spec_message_lists_the_valid_forms() -> None:
    with pytest.raises(UserError) as err:
        parse_spec("cifar10")
    msg = str(err.value)
    assert "'cifar10'" in msg
    for form in ("fashion[0-4]", "digits", "folder:PATH", "npz:PATH"):
        assert form in msg


def test_user_error_is_a_value_error() -> None:
    assert issubclass(UserError, ValueError)
    assert pt.UserError is UserError


# ------------------------------------------------------------------------------------- fashion (real)


@needs_fashion
def test_fashion_shots_per_class_and_reindexed_labels() -> None:
    task = load_task("fashion[5-9]", shots=7, seed=3)
    assert task.num_classes == 5
    assert task.classes == ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert task.in_shape == (1, 28, 28)
    assert torch.bincount(task.train.y, minlength=5).tolist() == [7] * 5
    assert torch.bincount(task.val.y, minlength=5).tolist() == [7] * 5  # val_shots defaults to shots
    assert task.train.y.dtype == torch.int64
    assert task.train.x.dtype == torch.float32
    assert task.train.x.shape == (35, 1, 28, 28)
    # the official test split, restricted to the chosen classes (1000 per class)
    assert torch.bincount(task.test.y).tolist() == [1000] * 5
    # normalised to [-1, 1]
    for split in (task.train, task.val, task.test):
        assert split.x.min() >= -1.0 and split.x.max() <= 1.0
    assert task.info["source_classes"] == [5, 6, 7, 8, 9]
    assert task.shots == 7 and task.seed == 3 and task.spec == "fashion[5-9]"


@needs_fashion
def test_fashion_images_keep_their_true_labels() -> None:
    """Every selected image carries the re-indexed label of its original class (checked pixel by pixel)."""
    raw = sources.load_fashion()
    by_image: dict[bytes, set[int]] = {}
    for img, lab in zip(raw.x.flatten(1).numpy(), raw.y.tolist()):
        by_image.setdefault(img.tobytes(), set()).add(lab)
    chosen = (7, 3, 8)  # deliberately not sorted: label 0 is class 7
    task = load_task("fashion[7,3,8]", shots=10, seed=1)
    assert task.classes == ("Sneaker", "Dress", "Bag")
    for split in (task.train, task.val):
        imgs = _to_uint8(split.x).reshape(len(split), -1)
        for img, lab in zip(imgs, split.y.tolist()):
            assert chosen[lab] in by_image[img.tobytes()]


@needs_fashion
def test_fashion_val_is_disjoint_from_train() -> None:
    task = load_task("fashion[0-4]", shots=20, seed=5, val_shots=30)
    assert len(task.train) == 100 and len(task.val) == 150
    assert len(_rows(task.train.x)) == 100  # no image twice in train
    assert _rows(task.train.x).isdisjoint(_rows(task.val.x))


@needs_fashion
def test_fashion_val_fraction_without_shots() -> None:
    task = load_task("fashion[0-1]", seed=0, val_fraction=0.25)
    # 6000 training images per class; a quarter of each is held out
    assert torch.bincount(task.val.y).tolist() == [1500, 1500]
    assert torch.bincount(task.train.y).tolist() == [4500, 4500]
    assert _rows(task.train.x[:500]).isdisjoint(_rows(task.val.x))


@needs_fashion
def test_fashion_limit_caps_training_examples() -> None:
    task = load_task("fashion[0-4]", seed=0, limit=50, test_limit=40)
    assert len(task.train) == 50
    assert len(task.test) == 40
    assert set(task.train.y.tolist()) <= set(range(5))
    again = load_task("fashion[0-4]", seed=9, limit=50, test_limit=40)
    assert torch.equal(task.test.x, again.test.x)  # test_limit is fixed across seeds
    with pytest.raises(UserError, match="smaller than the number of classes"):
        load_task("fashion[0-4]", seed=0, limit=4)


@needs_fashion
def test_fashion_same_seed_identical_different_seed_differs() -> None:
    a = load_task("fashion[0-4]", shots=5, seed=11)
    b = load_task("fashion[0-4]", shots=5, seed=11)
    c = load_task("fashion[0-4]", shots=5, seed=12)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).x, getattr(b, name).x)
        assert torch.equal(getattr(a, name).y, getattr(b, name).y)
    assert _rows(a.train.x) != _rows(c.train.x)
    assert torch.equal(a.test.x, c.test.x)  # the official test split does not depend on the seed


@needs_fashion
def test_fashion_train_picks_are_nested_across_shots() -> None:
    """The per-class permutation depends on the seed only: fewer shots give a prefix of more shots."""
    small = load_task("fashion[0-1]", shots=3, seed=4)
    large = load_task("fashion[0-1]", shots=8, seed=4)
    assert _rows(small.train.x) <= _rows(large.train.x)


@needs_fashion
def test_fashion_class_outside_dataset() -> None:
    with pytest.raises(UserError) as err:
        load_task("fashion[8-12]", shots=5)
    msg = str(err.value)
    assert "10" in msg and "0-9" in msg


@needs_fashion
@pytest.mark.parametrize("shots", [0, -3])
def test_shots_below_one(shots: int) -> None:
    with pytest.raises(UserError, match="shots must be at least 1"):
        load_task("fashion[0-1]", shots=shots)


@needs_fashion
def test_shots_larger_than_available() -> None:
    with pytest.raises(UserError) as err:
        load_task("fashion[0-1]", shots=6000)  # 6000 per class, one must stay for validation
    assert "shots <= 5999" in str(err.value)


def test_bad_val_options() -> None:
    with pytest.raises(UserError, match="val_shots"):
        load_task("digits[0-1]", shots=3, val_shots=0)
    for frac in (0.0, 1.0, 1.5):
        with pytest.raises(UserError, match="val_fraction"):
            load_task("digits[0-1]", val_fraction=frac)


def test_missing_fashion_dir_argument(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_task("fashion[0-4]", shots=5, data_dir=str(tmp_path))
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path) in msg
    assert "PARAMTRANSFER_DATA" in msg


def test_missing_fashion_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    monkeypatch.setenv("PARAMTRANSFER_DATA", str(empty))
    sources.clear_cache()  # load_fashion(None) may be cached from the Debian directory
    try:
        with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
            load_task("fashion[0-4]", shots=5)
    finally:
        sources.clear_cache()


@needs_fashion
def test_env_var_is_honoured_after_default_was_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PARAMTRANSFER_DATA set later in the process must not be shadowed by the cached default load."""
    load_task("fashion[0-1]", shots=1)  # loads (and caches) the Debian copy
    monkeypatch.setenv("PARAMTRANSFER_DATA", str(tmp_path))
    try:
        with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
            load_task("fashion[0-1]", shots=1)
    finally:
        monkeypatch.delenv("PARAMTRANSFER_DATA")
        sources.clear_cache()


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def _fake_fashion(root: Path, compress: bool) -> None:
    """10 classes x 3 training images (class c, image i filled with 20*c + i) and 1 test image per class."""
    root.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(10), 3)
    values = 20 * labels + np.tile(np.arange(3), 10)
    train = np.broadcast_to(values[:, None, None], (30, 28, 28))
    test_labels = np.arange(10)[::-1].copy()
    test = np.broadcast_to((200 + test_labels)[:, None, None], (10, 28, 28))
    _write_idx(root / "train-images-idx3-ubyte", train, compress)
    _write_idx(root / "train-labels-idx1-ubyte", labels, compress)
    _write_idx(root / "t10k-images-idx3-ubyte", test, compress)
    _write_idx(root / "t10k-labels-idx1-ubyte", test_labels, compress)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_reader_on_hand_written_idx_files(tmp_path: Path, compress: bool) -> None:
    _fake_fashion(tmp_path / "fm", compress)
    try:
        task = load_task("fashion[6,2]", shots=1, seed=0, data_dir=str(tmp_path / "fm"))
        assert task.classes == ("Shirt", "Pullover")
        # one train + one val image per class (val_shots = shots, capped by what is left: 3 - 1 = 2)
        assert torch.bincount(task.train.y).tolist() == [1, 1]
        assert torch.bincount(task.val.y).tolist() == [1, 1]
        for split in (task.train, task.val):
            vals = _to_uint8(split.x).reshape(len(split), -1)
            assert (vals == vals[:, :1]).all()  # the images stay constant
            for v, lab in zip(vals[:, 0].tolist(), split.y.tolist()):
                assert v // 20 == (6, 2)[lab]  # image of class 6 -> label 0, class 2 -> label 1
        assert _rows(task.train.x).isdisjoint(_rows(task.val.x))
        # the test split is the t10k file, in file order: label 9,...,0 -> class 6 comes before class 2
        assert task.test.y.tolist() == [0, 1]
        assert _to_uint8(task.test.x)[:, 0, 0, 0].tolist() == [206, 202]
        expected = (206 / 255 - 0.5) / 0.5
        assert torch.allclose(task.test.x[0], torch.full((1, 28, 28), expected))
        with pytest.raises(UserError, match="shots <= 2"):
            load_task("fashion[6,2]", shots=3, data_dir=str(tmp_path / "fm"))
    finally:
        sources.clear_cache()


def test_fashion_reader_rejects_non_idx_file(tmp_path: Path) -> None:
    _fake_fashion(tmp_path, compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"not an idx file at all")
    try:
        with pytest.raises(UserError, match="idx"):
            load_task("fashion", data_dir=str(tmp_path))
    finally:
        sources.clear_cache()


# ----------------------------------------------------------------------------------------------- digits


def test_digits_upsampled_and_test_split_fixed() -> None:
    a = load_task("digits", shots=5, seed=0)
    b = load_task("digits", shots=5, seed=1)
    assert a.in_shape == (1, 28, 28)
    assert a.train.x.shape == (50, 1, 28, 28)
    assert a.classes == tuple(str(i) for i in range(10))
    # a fixed third of each class: floor(n_c / 3) for the counts 178,182,177,183,181,182,181,179,174,180
    assert torch.bincount(a.test.y).tolist() == [59, 60, 59, 61, 60, 60, 60, 59, 58, 60]
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)
    assert _rows(a.train.x) != _rows(b.train.x)
    # train, val and test are carved from disjoint index sets
    assert _rows(a.train.x).isdisjoint(_rows(a.test.x))
    assert _rows(a.val.x).isdisjoint(_rows(a.test.x))
    assert _rows(a.train.x).isdisjoint(_rows(a.val.x))


def test_digits_subset_and_upsampling_matches_fit_shape() -> None:
    from sklearn.datasets import load_digits

    task = load_task("digits[3-4]", shots=4, seed=2)
    assert task.classes == ("3", "4")
    assert torch.bincount(task.train.y).tolist() == [4, 4]
    d = load_digits()
    imgs = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    up = (fit_shape(imgs, (1, 28, 28)) - 0.5) / 0.5
    # every training image is the upsampled version of a digit of the right class
    for x, lab in zip(task.train.x, task.train.y.tolist()):
        dist = (up - x).flatten(1).abs().amax(1)
        j = int(dist.argmin())
        assert dist[j] < 1e-5
        assert int(d.target[j]) == 3 + lab


def test_digits_shots_boundary() -> None:
    # digit 0 has 178 images; floor(178/3) = 59 go to test, 119 remain, one must stay for validation
    # (digit 1 has 182: 60 to test, 122 remain)
    task = load_task("digits[0-1]", shots=118, seed=0)
    assert len(task.train) == 236 and torch.bincount(task.val.y).tolist() == [1, 4]
    with pytest.raises(UserError, match="shots <= 118"):
        load_task("digits[0-1]", shots=119, seed=0)


def test_digits_class_outside() -> None:
    with pytest.raises(UserError, match="0-9"):
        load_task("digits[9-10]", shots=2)


# ----------------------------------------------------------------------------------------------- folder


def _make_folder(root: Path) -> dict[str, tuple[int, int, int]]:
    from PIL import Image

    colours = {"zebra": (0, 0, 255), "apple": (255, 0, 0), "mango": (90, 180, 30)}
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (10, 10), rgb).save(root / name / f"img{i}.png")
    (root / ".hidden").mkdir()  # ignored
    (root / "apple" / "notes.txt").write_text("not an image")  # ignored
    return colours


def test_folder_task(tmp_path: Path) -> None:
    colours = _make_folder(tmp_path / "imgs")
    task = load_task(f"folder:{tmp_path / 'imgs'}", seed=0)
    assert task.classes == ("apple", "mango", "zebra")  # sorted folder names
    assert task.in_shape == (1, 28, 28)
    assert task.train.x.shape[1:] == (1, 28, 28)
    # 6 per class: floor(6/3) = 2 to test, 4 left; val = max(1, round(0.1 * 4)) = 1, train 3
    assert torch.bincount(task.test.y).tolist() == [2, 2, 2]
    assert torch.bincount(task.val.y).tolist() == [1, 1, 1]
    assert torch.bincount(task.train.y).tolist() == [3, 3, 3]
    for split in (task.train, task.val, task.test):
        for x, lab in zip(split.x, split.y.tolist()):
            rgb = colours[task.classes[lab]]
            grey = sum(rgb) / 3 / 255  # RGB -> grey is the channel mean
            assert torch.allclose(x, torch.full_like(x, (grey - 0.5) / 0.5), atol=1e-5)


def test_folder_task_keeps_rgb_when_asked(tmp_path: Path) -> None:
    colours = _make_folder(tmp_path / "imgs")
    task = load_task(f"folder:{tmp_path / 'imgs'}", shots=2, seed=1, in_shape=(3, 16, 16))
    assert task.train.x.shape == (6, 3, 16, 16)
    assert torch.bincount(task.val.y).tolist() == [2, 2, 2]
    for x, lab in zip(task.train.x, task.train.y.tolist()):
        want = (torch.tensor(colours[task.classes[lab]], dtype=torch.float32) / 255 - 0.5) / 0.5
        assert torch.allclose(x, want[:, None, None].expand(3, 16, 16), atol=1e-5)


def test_folder_mixed_sizes_and_grey(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "mixed"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(3):
        Image.new("L", (10, 10), 40).save(root / "a" / f"{i}.png")
        Image.new("RGB", (20, 14), (200, 100, 0)).save(root / "b" / f"{i}.jpg")
    raw = sources.load_folder(str(root))
    assert raw.x.shape == (6, 3, 10, 10)  # grey repeated to RGB, every image resized to the first's size
    assert raw.x.dtype == torch.uint8  # pixels as stored; the pipeline divides by 255 per batch
    assert torch.allclose(raw.x[:3].float() / 255, torch.full((3, 3, 10, 10), 40 / 255))
    assert raw.y.tolist() == [0, 0, 0, 1, 1, 1]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_task(f"folder:{tmp_path / 'missing'}")
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    with pytest.raises(UserError, match="at least two class"):
        load_task(f"folder:{one}")
    (one / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        load_task(f"folder:{one}")


def test_folder_unreadable_image_names_the_file(tmp_path: Path) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, "PNG")
    png = buf.getvalue()
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buf, "JPEG")
    jpeg = buf.getvalue()
    bad_files = {
        "not_an_image.png": b"this is text, not a picture",
        "empty.jpg": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
    }
    for i, (name, data) in enumerate(bad_files.items()):
        root = tmp_path / f"set{i}"
        _make_folder(root)
        (root / "mango" / name).write_bytes(data)
        with pytest.raises(UserError) as err:
            load_task(f"folder:{root}", seed=0)
        msg = str(err.value)
        assert str(root / "mango" / name) in msg and "remove or fix it" in msg, msg
        assert "\n" not in msg


# -------------------------------------------------------------------------------------------------- npz


def test_npz_task_reindexes_labels(tmp_path: Path) -> None:
    # 3 classes with labels 3, 7, 9 (not contiguous); image value encodes the label
    y = np.repeat([9, 3, 7], 6)
    x = np.broadcast_to((y * 20).astype(np.uint8)[:, None, None], (18, 28, 28)).copy()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    task = load_task(f"npz:{tmp_path / 'd.npz'}", shots=2, seed=0)
    assert task.classes == ("3", "7", "9")
    assert torch.bincount(task.train.y).tolist() == [2, 2, 2]
    assert torch.bincount(task.test.y).tolist() == [2, 2, 2]  # no x_test: a fixed third of each class
    for split in (task.train, task.val, task.test):
        vals = _to_uint8(split.x)[:, 0, 0, 0]
        for v, lab in zip(vals.tolist(), split.y.tolist()):
            assert v == 20 * int(task.classes[lab])


def test_npz_with_test_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((20, 1, 28, 28)).astype(np.float32)  # already in [0, 1], NCHW
    y = np.repeat([0, 1], 10)
    x_test = rng.random((4, 1, 28, 28)).astype(np.float32)
    y_test = np.array([1, 0, 1, 1])
    np.savez(tmp_path / "t.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    task = load_task(f"npz:{tmp_path / 't.npz'}", seed=0)
    assert task.classes == ("0", "1")
    assert task.test.y.tolist() == [1, 0, 1, 1]
    assert torch.allclose(task.test.x, (torch.from_numpy(x_test) - 0.5) / 0.5)
    assert len(task.train) + len(task.val) == 20  # all of x is the training pool
    assert torch.bincount(task.val.y).tolist() == [1, 1]  # round(0.1 * 10) per class
    # a label that only the test set has cannot be learned
    np.savez(tmp_path / "t2.npz", x=x, y=y, x_test=x_test, y_test=np.array([1, 0, 1, 2]))
    with pytest.raises(UserError, match="'2'"):
        load_task(f"npz:{tmp_path / 't2.npz'}", seed=0)


def test_npz_layouts(tmp_path: Path) -> None:
    y = np.array([0, 1, 0, 1])
    flat = np.arange(4 * 16, dtype=np.float32).reshape(4, 16) / 100  # 4x4 images, flattened
    np.savez(tmp_path / "flat.npz", x=flat, y=y)
    raw = sources.load_npz(str(tmp_path / "flat.npz"))
    assert raw.x.shape == (4, 1, 4, 4)
    assert torch.allclose(raw.x[1, 0, 2], torch.tensor([24.0, 25.0, 26.0, 27.0]) / 100)
    nhwc = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    nhwc[..., 2] = 255
    np.savez(tmp_path / "nhwc.npz", x=nhwc, y=y)
    raw = sources.load_npz(str(tmp_path / "nhwc.npz"))
    assert raw.x.shape == (4, 3, 8, 8)
    assert raw.x[:, 2].min() == 1.0 and raw.x[:, :2].max() == 0.0
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 15)), y=y)
    with pytest.raises(UserError, match="shape"):
        sources.load_npz(str(tmp_path / "bad.npz"))


def test_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "noy.npz", x=np.zeros((4, 28, 28)), labels=np.zeros(4))
    with pytest.raises(UserError) as err:
        load_task(f"npz:{tmp_path / 'noy.npz'}")
    assert "'y'" in str(err.value) and "labels" in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        load_task(f"npz:{tmp_path / 'missing.npz'}")


def _xy(n: int = 12, side: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``n`` small uint8 images (values 0 to 255) and labels alternating 0/1."""
    size = n * side * side
    x = (np.arange(size) * 255 // (size - 1)).astype(np.uint8).reshape(n, side, side)
    return x, np.arange(n) % 2


def _npz_error(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    with pytest.raises(UserError) as err:
        load_task(f"npz:{path}", seed=0)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("key", ["x", "x_test"])
def test_npz_nan_or_inf_pixels_refused(tmp_path: Path, bad: float, key: str) -> None:
    x, y = _xy()
    arrays = {"x": x.astype(np.float32), "y": y, "x_test": x[:4].astype(np.float64), "y_test": y[:4]}
    arrays[key][3, 1, 2] = bad  # 0-255 data: NaN used to switch off the 0-255 detection silently
    msg = _npz_error(tmp_path / "bad.npz", **arrays)
    assert f"{key} holds NaN or infinite values" in msg and "index 3" in msg


def test_npz_length_mismatch_refused(tmp_path: Path) -> None:
    x, y = _xy()
    msg = _npz_error(tmp_path / "a.npz", x=x, y=y[:-1])
    assert "x holds 12 images but y holds 11 labels" in msg
    msg = _npz_error(tmp_path / "b.npz", x=x, y=y, x_test=x[:5], y_test=y[:4])
    assert "x_test holds 5 images but y_test holds 4 labels" in msg


@pytest.mark.parametrize(("have", "missing"), [("x_test", "y_test"), ("y_test", "x_test")])
def test_npz_one_test_array_without_the_other_refused(tmp_path: Path, have: str, missing: str) -> None:
    x, y = _xy()
    msg = _npz_error(tmp_path / "t.npz", x=x, y=y, **{have: x[:4] if have == "x_test" else y[:4]})
    assert f"has {have} but no {missing}" in msg


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        (np.array([0, 1.5] * 6), "non-integer label 1.5"),
        (np.array([0, np.nan] * 6), "non-integer label"),
        (np.array(["cat", "dog"] * 6), "not integer class labels"),
        (np.array([0, 1j] * 6), "not integer class labels"),
        (np.zeros((12, 2)), "one-hot"),
    ],
)
def test_npz_bad_labels_refused(tmp_path: Path, labels: np.ndarray, fragment: str) -> None:
    x, _ = _xy()
    assert fragment in _npz_error(tmp_path / "l.npz", x=x, y=labels)


def test_npz_whole_float_and_bool_labels_accepted(tmp_path: Path) -> None:
    x, y = _xy()
    y_float = (y * 4 + 3).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=y_float, x_test=x[:2], y_test=np.array([7.0, 3.0]))
    raw = sources.load_npz(str(tmp_path / "f.npz"))
    assert raw.classes == ("3", "7")  # named as integers, not "3.0"
    assert raw.y.tolist() == y.tolist() and raw.y_test.tolist() == [1, 0]
    np.savez(tmp_path / "b.npz", x=x, y=y.astype(bool)[:, None])  # [N, 1] is read as [N]
    raw = sources.load_npz(str(tmp_path / "b.npz"))
    assert raw.classes == ("0", "1") and raw.y.tolist() == y.tolist()


def test_npz_object_array_refused(tmp_path: Path) -> None:
    x, y = _xy()
    labels = np.array([0, "1", None] * 4, dtype=object)
    msg = _npz_error(tmp_path / "o.npz", x=x, y=labels)
    assert "'y' holds Python objects" in msg and "numpy.savez" in msg


def test_npz_not_an_archive_refused(tmp_path: Path) -> None:
    x, y = _xy()
    np.savez(tmp_path / "good.npz", x=x, y=y)
    good = (tmp_path / "good.npz").read_bytes()
    np.save(tmp_path / "arr.npy", x)
    files = {
        "random.npz": bytes(range(256)) * 8,
        "empty.npz": b"",
        "truncated.npz": good[: len(good) // 2],
        "cut_short.npz": good[:-30],
        "plain.npz": (tmp_path / "arr.npy").read_bytes(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError) as err:
            load_task(f"npz:{tmp_path / name}", seed=0)
        msg = str(err.value)
        assert str(tmp_path / name) in msg and "numpy.savez" in msg, msg
        assert (".npy array" if name == "plain.npz" else "not an npz archive") in msg


def test_npz_damaged_member_refused(tmp_path: Path) -> None:
    x, y = _xy(200, 8)
    np.savez_compressed(tmp_path / "c.npz", x=x, y=y)
    data = bytearray((tmp_path / "c.npz").read_bytes())
    start = data.index(b"x.npy") + 80  # inside the compressed stream of x
    data[start : start + 40] = bytes(40)
    (tmp_path / "c.npz").write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged npz archive|cannot be read"):
        load_task(f"npz:{tmp_path / 'c.npz'}", seed=0)


@pytest.mark.parametrize(
    ("scale", "fragment"),
    [(-1.0, "pixel values from -0.5 to 0.5"), (60.0, "from 0 to 15300")],
)
def test_npz_pixels_outside_both_ranges_refused(tmp_path: Path, scale: float, fragment: str) -> None:
    x, y = _xy()
    x = x.astype(np.float32) / 255 - 0.5 if scale < 0 else x.astype(np.int32) * 60
    msg = _npz_error(tmp_path / "r.npz", x=x, y=y)
    assert fragment in msg and "[0, 1] or [0, 255]" in msg


def test_npz_pixel_scales_accepted(tmp_path: Path) -> None:
    x, y = _xy()
    np.savez(tmp_path / "u8.npz", x=x, y=y)
    np.savez(tmp_path / "unit.npz", x=x.astype(np.float64) / 255, y=y)
    a = sources.load_npz(str(tmp_path / "u8.npz")).x
    b = sources.load_npz(str(tmp_path / "unit.npz")).x
    assert torch.allclose(a, b) and float(a.max()) == 1.0


# ----------------------------------------------------------------------------------------- one class


@pytest.mark.parametrize(("spec", "cure"), [("digits[3]", "digits[3-9]"), ("digits[9-9]", "digits[0-9]")])
def test_one_class_selection_refused(spec: str, cure: str) -> None:
    with pytest.raises(UserError) as err:
        load_task(spec, shots=2, seed=0)
    msg = str(err.value)
    assert "at least 2 classes" in msg and f"e.g. {cure}" in msg


@needs_fashion
def test_one_class_fashion_refused() -> None:
    with pytest.raises(UserError, match=r"at least 2 classes.*'Sandal'.*fashion\[5-9\]"):
        load_task("fashion[5-5]", shots=2, seed=0)


def test_one_class_npz_refused(tmp_path: Path) -> None:
    x, _ = _xy()
    np.savez(tmp_path / "one.npz", x=x, y=np.full(12, 4))
    with pytest.raises(UserError, match="at least 2 classes.*only class '4'"):
        load_task(f"npz:{tmp_path / 'one.npz'}", shots=2, seed=0)


# ---------------------------------------------------------------------------------------------- fit_shape


def test_fit_shape_grey_to_rgb() -> None:
    x = torch.rand(2, 1, 5, 5)
    out = fit_shape(x, (3, 5, 5))
    assert out.shape == (2, 3, 5, 5)
    assert out.is_contiguous()
    for c in range(3):
        assert torch.equal(out[:, c], x[:, 0])


def test_fit_shape_rgb_to_grey_is_channel_mean() -> None:
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0] = 0.3
    x[0, 1] = 0.6
    x[0, 2] = 0.9
    assert torch.allclose(fit_shape(x, (1, 2, 2)), torch.full((1, 1, 2, 2), 0.6))
    rgba = torch.cat([x, torch.ones(1, 1, 2, 2)], dim=1)  # alpha is dropped
    assert torch.allclose(fit_shape(rgba, (1, 2, 2)), torch.full((1, 1, 2, 2), 0.6))


def test_fit_shape_bilinear_upsample_hand_computed() -> None:
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    out = fit_shape(x, (1, 4, 4))
    # align_corners=False: output pixel j samples at (j + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 (clamped)
    a = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = 2 * a[:, None] + a[None, :]
    assert torch.allclose(out[0, 0], expected)


def test_fit_shape_downsample_and_identity() -> None:
    x = torch.full((3, 1, 8, 8), 0.4)
    out = fit_shape(x, (1, 4, 4))
    assert out.shape == (3, 1, 4, 4)
    assert torch.allclose(out, torch.full_like(out, 0.4))
    y = torch.rand(2, 1, 6, 6)
    assert torch.equal(fit_shape(y, (1, 6, 6)), y)


def test_fit_shape_bad_channels() -> None:
    with pytest.raises(UserError, match="2-channel"):
        fit_shape(torch.zeros(1, 2, 4, 4), (3, 4, 4))
    with pytest.raises(UserError):
        fit_shape(torch.zeros(1, 3, 4, 4), (2, 4, 4))


# ---- an image's split depends on the dataset and the image, never on the selection ---------------


def _image_keys(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(len(x), -1)}


_SUBSET_SPECS = ["", "[0-4]", "[5-9]", "[0,5]", "[3-7]", "[9]"]


def test_no_test_image_of_one_seed_trains_another_npz(tmp_path: Path) -> None:
    # Every image unique (its index written in pixels), so image identity is exact.
    n = 300
    idx = np.arange(n)
    x = np.stack([(idx // 256) % 256, idx % 256, np.full(n, 7)], axis=1).astype(np.uint8)
    x = np.repeat(x[:, :, None], 3, axis=2).reshape(n, 3, 3)
    np.savez(tmp_path / "uniq.npz", x=x, y=idx % 10)
    spec = f"npz:{tmp_path / 'uniq.npz'}"
    tasks = {
        f"seed {seed} shots {shots}": load_task(spec, shots=shots, seed=seed, in_shape=(1, 3, 3))
        for seed in (0, 1, 2)
        for shots in (None, 5)
    }
    _assert_no_cross_leak(tasks)


def _assert_no_cross_leak(tasks: dict[str, pt.Task]) -> None:
    for a, ta in tasks.items():
        test_a = _image_keys(ta.test.x)
        for b, tb in tasks.items():
            seen_b = _image_keys(tb.train.x) | _image_keys(tb.val.x)
            assert not test_a & seen_b, f"{len(test_a & seen_b)} test images of {a} train/validate {b}"


@pytest.mark.parametrize("seed", [0, 1])
def test_no_test_image_of_one_digits_spec_trains_another(seed: int) -> None:
    raw = sources.load_digits()
    keys = [row.numpy().tobytes() for row in raw.x.reshape(len(raw.x), -1)]
    dup = {k for k in keys if keys.count(k) > 1}
    tasks = {
        s: load_task(f"digits{s}", shots=None, seed=seed, in_shape=(1, 8, 8)) for s in _SUBSET_SPECS[:-1]
    }
    for a, ta in tasks.items():
        test_a = _image_keys(ta.test.x) - dup
        for b, tb in tasks.items():
            seen_b = _image_keys(tb.train.x) | _image_keys(tb.val.x)
            assert not test_a & seen_b, f"{len(test_a & seen_b)} test images of digits{a} train digits{b}"
    # and the test set of a subset is exactly the full test set restricted to its classes
    full = tasks[""]
    half = tasks["[5-9]"]
    assert _image_keys(half.test.x) == _image_keys(full.test.x[full.test.y >= 5])
