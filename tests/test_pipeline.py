"""The image pipeline (raw images -> model input at batch time), augmentation, the frozen-prefix cache,
and device/precision handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import paramtransfer as pt
from paramtransfer.data.pipeline import Augment, InputSpec, sample_crops, to_input
from paramtransfer.errors import UserError
from paramtransfer.experiments.run import _fingerprint, train_model
from paramtransfer.methods.base import make_method
from paramtransfer.models.layered import freeze
from paramtransfer.runtime import Runtime, resolve_device
from paramtransfer.train.checkpoint import load_checkpoint
from paramtransfer.train.trainer import TrainConfig, fit, keep_frozen_batchnorm, prefix_cache

# --------------------------------------------------------------------------------------------- to_input


def test_uint8_to_input_is_scaled_and_normalised_per_channel():
    x = torch.tensor([[[[0, 255]], [[51, 102]], [[255, 0]]]], dtype=torch.uint8)  # 1x3x1x2
    spec = InputSpec.of((3, 1, 2), mean=(0.5, 0.2, 0.0), std=(0.5, 0.1, 1.0))
    out = to_input(x, spec)
    expected = torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]], [[1.0, 0.0]]]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_float_pixels_pass_unscaled_and_zoo_default_is_minus_one_to_one():
    x = torch.tensor([[[[0.0, 0.25, 1.0]]]])
    out = to_input(x, InputSpec.of((1, 1, 3)))
    assert torch.equal(out, torch.tensor([[[[-1.0, -0.5, 1.0]]]]))


def test_grey_to_rgb_repeats_and_rgb_to_grey_averages():
    grey = torch.arange(4, dtype=torch.uint8).reshape(1, 1, 2, 2) * 60
    rgb = to_input(grey, InputSpec.of((3, 2, 2), (0.0,) * 3, (1.0,) * 3))
    assert rgb.shape == (1, 3, 2, 2) and torch.equal(rgb[:, 0], rgb[:, 2])
    colour = torch.zeros(1, 3, 1, 1)
    colour[0, :, 0, 0] = torch.tensor([0.3, 0.6, 0.9])
    back = to_input(colour, InputSpec.of((1, 1, 1), (0.0,), (1.0,)))
    assert back.item() == pytest.approx(0.6)


def test_resize_to_the_spec_size_and_larger_images_shrink():
    big = torch.randint(0, 256, (2, 3, 50, 40), dtype=torch.uint8)
    out = to_input(big, InputSpec.of((1, 32, 32)))
    assert out.shape == (2, 1, 32, 32)
    assert out.min() >= -1 and out.max() <= 1


def test_a_batch_converts_like_the_whole_split():
    task = pt.load_task("digits", shots=3, seed=0, image_size=20)
    whole = task.train.inputs()
    assert torch.equal(whole[2:5], task.train.inputs(slice(2, 5)))
    assert whole.shape[1:] == (1, 20, 20)


# ------------------------------------------------------------------------------------------- crops


def test_crops_are_seeded_inside_the_image_and_of_the_allowed_area():
    aug = Augment()
    a = sample_crops(200, 30, 40, aug, torch.Generator().manual_seed(1))
    b = sample_crops(200, 30, 40, aug, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    top, left, h, w, flip = a.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 30).all() and (left + w <= 40).all()
    area = (h * w).double() / (30 * 40)
    assert area.max() <= 1.0 + 1e-9 and area.min() >= 0.05  # 0.08 up to rounding of small crops
    assert 0.35 < flip.double().mean() < 0.65
    assert not torch.equal(a, sample_crops(200, 30, 40, aug, torch.Generator().manual_seed(2)))


def test_impossible_aspect_falls_back_to_the_central_crop():
    aug = Augment(scale=(1.0, 1.0), ratio=(2.0, 3.0), flip=0.0)  # a whole 10x10 image is never 2:1
    (row,) = sample_crops(1, 10, 10, aug, torch.Generator().manual_seed(0)).tolist()
    assert row == [(10 - 5) // 2, 0, 5, 10, 0]


def test_whole_image_crop_equals_plain_resize_and_flip_mirrors():
    x = torch.randint(0, 256, (2, 1, 12, 12), dtype=torch.uint8)
    spec = InputSpec.of((1, 24, 24))
    full = torch.tensor([[0, 0, 12, 12, 0], [0, 0, 12, 12, 1]])
    out = to_input(x, spec, full)
    plain = to_input(x, spec)
    assert torch.equal(out[0], plain[0])
    assert torch.equal(out[1], plain[1].flip(-1))


# ----------------------------------------------------------------------------------------- tasks and runs


def test_tasks_keep_native_uint8_images():
    task = pt.load_task("fashion[5-9]", shots=2, seed=0, test_limit=10, image_size=64)
    assert task.train.images.dtype == torch.uint8 and task.train.images.shape[1:] == (1, 28, 28)
    assert task.in_shape == (1, 64, 64)
    assert task.train.inputs().shape == (10, 1, 64, 64)


def test_image_size_out_of_range_is_refused():
    with pytest.raises(UserError, match="image_size"):
        pt.data.task.load_task("digits", shots=2, image_size=0)


def test_grey_fashion_feeds_a_three_channel_imagenet_net_at_64px():
    source = pt.build_model("efficientnet_lite0", 10, in_shape=(3, 224, 224), seed=0)
    result, model = train_model(
        "linear_probe",
        source=source,
        target="fashion[5-9]",
        shots=1,
        val_shots=1,
        test_limit=10,
        image_size=64,
        epochs=1,
        lr=0.01,
        train_options={"batch_size": 5},
    )
    assert result.status == "ok" and result.config["data"]["image_size"] == 64
    assert model.in_shape == (3, 224, 224)  # the transferred net keeps its own description
    assert result.diagnostics["cached_prefix_blocks"] == source.num_blocks


def test_a_folder_of_large_jpegs_feeds_a_32px_resnet(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(4):
            pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / c / f"{i}.jpg")
    task = pt.load_task(f"folder:{tmp_path}", shots=1, image_size=32)
    assert task.train.images.shape[1:] == (3, 375, 500)
    result, _ = train_model(
        "scratch",
        source=None,
        arch="resnet20",
        target=f"folder:{tmp_path}",
        shots=1,
        image_size=32,
        epochs=1,
        lr=0.01,
    )
    assert result.status == "ok"


def test_image_size_a_lenet_source_cannot_take_is_one_clear_error(tiny_source):
    with pytest.raises(UserError, match="cannot take 64x64 images"):
        train_model("finetune", source=tiny_source, target="digits", shots=2, image_size=64, epochs=1)


# ------------------------------------------------------------------------------------------ augmentation


def _fit(spec, source, task, seed=0, checkpoint=None, callbacks=(), **cfg):
    m = make_method(spec)
    model = m.build(source, task.num_classes, arch=source.arch, in_shape=tuple(task.in_shape), seed=seed)
    config = TrainConfig(**{"epochs": 3, "lr": 0.05, "batch_size": 8, **cfg})
    out = fit(model, m, task, config, seed=seed, checkpoint=checkpoint, fingerprint="fp", callbacks=callbacks)
    return out, model


def _losses(out):
    return [(r["train_loss"], r["val_loss"]) for r in out.history]


def test_augmentation_is_seeded_and_changes_training(tiny_source, tiny_task):
    a, _ = _fit("finetune", tiny_source, tiny_task, augment=True)
    b, _ = _fit("finetune", tiny_source, tiny_task, augment=True)
    plain, _ = _fit("finetune", tiny_source, tiny_task)
    assert _losses(a) == _losses(b)
    assert _losses(a) != _losses(plain)


class _Crash(RuntimeError):
    pass


def test_augmented_run_resumes_bit_for_bit(tiny_source, tiny_task, tmp_path):
    ref, ref_model = _fit("finetune", tiny_source, tiny_task, augment=True)

    def crash(event, **kw):
        if event == "on_epoch_end" and kw["record"]["epoch"] == 2:
            raise _Crash

    path = tmp_path / "checkpoint.pt"
    with pytest.raises(_Crash):
        _fit("finetune", tiny_source, tiny_task, augment=True, checkpoint=path, callbacks=[crash])
    assert load_checkpoint(path)["crop_rng"] is not None
    out, model = _fit("finetune", tiny_source, tiny_task, augment=True, checkpoint=path)
    assert out.resumed_from_epoch == 1
    assert _losses(out) == _losses(ref)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


# ----------------------------------------------------------------------------------- frozen-prefix cache


def _first_epoch_close(a, b):
    """The cached and the uncached run agree on their first epoch to float rounding. Later epochs are
    not compared: with BatchNorm on batches of 8, rounding differences of 1e-7 (convolutions computed on
    256 rows at once rather than 8) grow to 1e-4 within a few steps, in either direction."""
    (ta, va), (tb, vb) = _losses(a)[0], _losses(b)[0]
    assert math.isclose(ta, tb, rel_tol=1e-5) and math.isclose(va, vb, rel_tol=1e-5)
    assert len(a.history) == len(b.history)


@pytest.mark.parametrize("spec, depth", [("finetune[freeze=2]", 2), ("linear_probe", None), ("finetune", 0)])
def test_prefix_cache_matches_the_uncached_path(tiny_resnet_source, tiny_task, spec, depth):
    depth = tiny_resnet_source.num_blocks if depth is None else depth
    cached, cached_model = _fit(spec, tiny_resnet_source, tiny_task, lr=0.01)
    plain, _ = _fit(spec, tiny_resnet_source, tiny_task, lr=0.01, prefix_cache_mb=0)
    assert cached.cached_prefix == depth and plain.cached_prefix == 0
    _first_epoch_close(cached, plain)
    for i in range(depth):  # the frozen blocks never moved, statistics included
        for k, v in cached_model.blocks[i].state_dict().items():
            assert torch.equal(v, tiny_resnet_source.blocks[i].state_dict()[k])
    if depth:  # what the cache holds is what the frozen blocks compute
        m = make_method(spec)
        model = m.build(tiny_resnet_source, 5, arch="resnet20", in_shape=(1, 28, 28), seed=0)
        _, train, _ = prefix_cache(model, m, tiny_task, TrainConfig(), Runtime(), False)
        with torch.no_grad():
            direct = model.eval().run_prefix(tiny_task.train.inputs(), depth)
        assert torch.allclose(train.images, direct, rtol=1e-5, atol=1e-6)


def test_prefix_cache_off_with_augmentation_over_budget_and_after_a_dropout(tiny_resnet_source, tiny_task):
    src = tiny_resnet_source
    assert _fit("linear_probe", src, tiny_task, epochs=1, augment=True)[0].cached_prefix == 0
    assert _fit("linear_probe", src, tiny_task, epochs=1)[0].cached_prefix == src.num_blocks
    many = pt.load_task("fashion[5-9]", shots=400, seed=0, val_shots=4, test_limit=10)
    sizes = [
        f[0].numel() * 4 * 2020 for f in src.features_until(many.train.inputs(slice(0, 1)), src.num_blocks)
    ]
    budget = 1 + sizes[-1] // 2**20  # the last block's outputs fit, the first blocks' do not
    assert sizes[1] > budget * 2**20

    def depth(spec, mb):
        m = make_method(spec)
        model = m.build(src, 5, arch=src.arch, in_shape=(1, 28, 28), seed=0)
        return prefix_cache(model, m, many, TrainConfig(prefix_cache_mb=mb), Runtime(), False)[0]

    assert depth("linear_probe", budget) == src.num_blocks
    assert depth("finetune[freeze=2]", budget) == 0
    assert depth("linear_probe", 1) == 0
    net = pt.LayeredNet(
        [
            torch.nn.Flatten(),
            torch.nn.Sequential(torch.nn.Linear(784, 8), torch.nn.Dropout(0.5)),
            torch.nn.ReLU(),
        ],
        torch.nn.Linear(8, 5),
        in_shape=(1, 28, 28),
    )
    freeze(net.blocks)
    assert net.frozen_prefix() == 1  # the block with a dropout is random in training: not cached


# ---------------------------------------------------------------------------------- device and precision


def test_absent_devices_and_unknown_names_are_user_errors():
    with pytest.raises(UserError, match="unknown"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_reduced_precision_trains_on_the_cpu(tiny_resnet_source, tiny_task, precision):
    out, model = _fit("finetune", tiny_resnet_source, tiny_task, epochs=2, device="cpu", precision=precision)
    assert not out.diverged and len(out.history) == 2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
    scaler = Runtime(torch.device("cpu"), precision).grad_scaler()
    assert (scaler is not None) == (precision == "16")  # loss scaling for float16 only


def test_device_and_cache_budget_are_not_part_of_a_run_identity():
    base = {"lr": 0.1, "train": {"epochs": 2, "trace_test": False}, "data": {"val_shots": None}}
    new = {
        "lr": 0.1,
        "train": {
            "epochs": 2,
            "trace_test": False,
            "augment": False,
            "precision": "32",
            "device": "cuda",
            "prefix_cache_mb": 7,
        },
        "data": {"val_shots": None},
    }
    ident = ["finetune", "digits", 0, "lenet"]
    for omit in (True, False):
        assert _fingerprint([*ident, base, "src"], omit_defaults=omit) == _fingerprint(
            [*ident, new, "src"], omit_defaults=omit
        )
    bf16 = {**new, "train": {**new["train"], "precision": "bf16"}}
    assert _fingerprint([*ident, bf16, "src"], omit_defaults=True) != _fingerprint(
        [*ident, base, "src"], omit_defaults=True
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_compare_on_cuda(tmp_path, tiny_source):
    from paramtransfer.cli import main

    for precision in ("32", "bf16", "16"):
        out = tmp_path / precision
        code = main(
            [
                "compare",
                "--source", "digits[0-4]", "--target", "digits[5-9]", "--shots", "5", "--epochs", "2",
                "--methods", "scratch,finetune,linear_probe,l2sp,knowdist,ptu,spottune,knn",
                "--lr", "0.01", "--seeds", "0", "--source-epochs", "1",
                "--device", "cuda", "--precision", precision, "--quiet", "--out", str(out),
            ]
        )  # fmt: skip
        assert code in (0, None)
        results = [pt.RunResult.load(p) for p in out.rglob("result.json")]
        assert len(results) >= 8 and all(r.status == "ok" for r in results)
        trained = [r for r in results if r.method not in ("knn",)]
        assert all(r.diagnostics["device"].startswith("cuda") for r in trained)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32", "bf16", "16"])
def test_issue16_methods_on_efficientnet_on_cuda(tiny_task, precision):
    """PTU, SpotTune and DTNH on EfficientNet-Lite0 (random weights, 32 px) train and evaluate on CUDA."""
    source = pt.build_model("efficientnet_lite0", num_classes=10, in_shape=(3, 32, 32), seed=0)
    options = {"device": "cuda", "precision": precision, "batch_size": 8, "bn": "frozen"}
    specs = ("ptu[layers=[2,4,6,7]]", "ptu[fixed_gates=true]", "spottune", "spottune_global", "dtnh:l2sp")
    for spec in specs:
        res = pt.run(spec, source=source, target=tiny_task, lr=0.01, epochs=2, seed=0, train_options=options)
        assert res.status == "ok" and res.diagnostics["device"].startswith("cuda"), spec


@pytest.mark.parametrize("spec", ["knowdist[beta=0.01]", "delta", "dtnh:knowdist[beta=0.01]"])
def test_teacher_cache_matches_the_uncached_path(tiny_resnet_source, tiny_task, spec):
    cached, _ = _fit(spec, tiny_resnet_source, tiny_task, lr=0.01)
    plain, _ = _fit(spec, tiny_resnet_source, tiny_task, lr=0.01, prefix_cache_mb=0)
    _first_epoch_close(cached, plain)
    m = make_method(spec)
    model = m.build(tiny_resnet_source, 5, arch="resnet20", in_shape=(1, 28, 28), seed=0)
    m.runtime = Runtime(cache_mb=2048)
    m.prepare(model, tiny_task)
    layers = {j % model.source.num_blocks for j in m.layers}
    assert {j for j, t in enumerate(m._teacher) if t is not None} == layers
    idx = torch.tensor([3, 0, 11])
    x = tiny_task.train.inputs(idx)
    model.train()
    keep_frozen_batchnorm(model)  # as the trainer does: the frozen teacher in eval mode
    _, _, from_cache = m.paired_features(model, x, idx)
    _, _, computed = m.paired_features(model, x, None)
    for j in layers:
        assert torch.allclose(from_cache[j], computed[j], rtol=1e-5, atol=1e-6)
    m.runtime = Runtime(augmenting=True)
    m.prepare(model, tiny_task)
    assert m._teacher is None
