"""The source store: save, load and key source models (weights as safetensors, metadata as JSON).

It never trains: :mod:`paramtransfer.experiments.pretrain` trains a source that is not stored yet.

Cache location: ``$PARAMTRANSFER_HOME`` (default ``~/.cache/paramtransfer``) ``/sources/<key>/``. A source
being pretrained holds the lock ``locks/<key>.lock`` under the same root, so two processes that need the
same source train it once: the second waits, then loads it.

A ``--source`` string is a task spec or a path (:func:`is_model_path`): a task spec (``fashion``,
``fashion[0-4]``, ``digits[...]``, ``folder:PATH``, ``npz:PATH``) always means the task; a source name
(:func:`is_source_name`: ``imagenet``, weights that ship with a package, see
:mod:`paramtransfer.models.imagenet`; ``torchvision:ARCH``, a torchvision state_dict file given apart,
see :mod:`paramtransfer.models.tvsource`) means those weights; a saved model
directory is written as a path: containing a ``/``, or starting with ``.`` or ``~`` (``./fashion``), or
ending in ``.safetensors``. So a folder named ``fashion`` in the working directory never takes over
``--source fashion``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from paramtransfer.errors import UserError
from paramtransfer.models.layered import LayeredNet
from paramtransfer.models.tvmodels import TORCHVISION_ARCHS
from paramtransfer.models.zoo import arch_problem, build_model
from paramtransfer.train.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
)

WEIGHTS = "model.safetensors"
META = "meta.json"
HASH_KEY = "weights_sha256"
_REQUIRED = ("arch", "num_classes", "in_shape", "arch_kwargs")


# --source names that are neither a task spec nor a path: weights that ship with an installed package
SOURCE_NAMES = ("imagenet",)
# --source torchvision:ARCH: a torchvision architecture, its weights from a file (--source-weights PATH)
TORCHVISION_PREFIX = "torchvision:"


def is_source_name(source: str) -> bool:
    """Whether a ``--source`` string names fixed weights (``imagenet``, ``torchvision:ARCH``) rather than
    a task or a path."""
    return isinstance(source, str) and (source.strip() in SOURCE_NAMES or is_torchvision_source(source))


def is_torchvision_source(source: Any) -> bool:
    """Whether a ``--source`` is ``torchvision:ARCH`` (whatever ARCH is)."""
    return isinstance(source, str) and source.strip().startswith(TORCHVISION_PREFIX)


def home() -> Path:
    return Path(os.environ.get("PARAMTRANSFER_HOME") or Path.home() / ".cache" / "paramtransfer")


def is_model_path(source: str) -> bool:
    """Whether a ``--source`` string names a saved model (a path) rather than a task spec.

    Task specs (``fashion``, ``digits[0-4]``, ``folder:PATH``, ``npz:PATH``) always mean the task, a source
    name (``imagenet``, ``torchvision:ARCH``) the weights it names. A path
    contains a ``/`` (or the OS separator), or starts with ``.`` or ``~``, or ends in ``.safetensors``:
    ``./fashion`` is the saved model in the folder ``fashion``, ``fashion`` the dataset.
    """
    s = source.strip()
    if s.startswith(("folder:", "npz:")) or is_source_name(s):
        return False
    separators = {"/", "\\", os.sep, *([os.altsep] if os.altsep else [])}
    return any(c in s for c in separators) or s.startswith((".", "~")) or s.endswith(".safetensors")


def _model_dir(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p.parent if p.suffix == ".safetensors" else p


def save_model(model: LayeredNet, directory: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``meta.json`` (architecture + ``meta`` + the weights' sha256) into
    ``directory``. Both files are written atomically, the metadata last."""
    if model.arch in ("custom", "wrapped"):
        raise UserError(
            "only zoo architectures can be saved and rebuilt; save a wrapped model's state_dict yourself"
        )
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    data = save_safetensors(tensors)
    atomic_write_bytes(d / WEIGHTS, data)
    info = {**model.describe(), **(meta or {}), HASH_KEY: hashlib.sha256(data).hexdigest()}
    atomic_write_json(d / META, info)
    return d


def _user_cure(d: Path) -> str:
    return (
        f"re-save it (`paramtransfer pretrain --out {shlex.quote(str(d))}` or pt.save_model), "
        "or give another saved model or a task spec as --source"
    )


def _pretrain_cure(directory: Path, arch: str, spec: str, settings: dict[str, Any]) -> str:
    """How to rebuild a cached source: the exact ``paramtransfer pretrain ... --force`` command when its
    settings are the command's flags, else delete the folder and run the same command again."""
    if settings.get("arch_kwargs") or settings.get("batch_size", 128) != 128:
        return f"delete {directory} and run the same command again (it pretrains the source anew)"
    cmd = ["paramtransfer", "pretrain", "--arch", arch, "--source", spec]
    cmd += ["--source-epochs", str(settings.get("epochs", 3))]
    if settings.get("limit") is not None:
        cmd += ["--source-limit", str(settings["limit"])]
    if settings.get("seed", 0) != 0:
        cmd += ["--seed", str(settings["seed"])]
    if settings.get("lr", 0.02) != 0.02:
        cmd += ["--lr", repr(settings["lr"])]
    return f"rebuild it: run `{shlex.join([*cmd, '--force'])}`"


def _default_cure(d: Path) -> str:
    """The cure for a broken saved model that :func:`load_model` was given without one."""
    try:
        in_cache = d.resolve().parent == (home() / "sources").resolve()
    except OSError:
        in_cache = False
    if not in_cache:
        return _user_cure(d)
    try:  # a cached source whose meta.json still says how it was made
        meta = json.loads((d / META).read_text())
        return _pretrain_cure(d, str(meta["arch"]), str(meta["source"]), dict(meta["settings"]))
    except (OSError, ValueError, KeyError, TypeError):
        return f"delete {d} (a cached source) and run the same command again (it pretrains the source anew)"


def _read_meta(d: Path, fail: Callable[[Path, str], NoReturn]) -> dict[str, Any]:
    path = d / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        fail(path, f"is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})")
    except (OSError, UnicodeDecodeError) as err:
        fail(path, f"cannot be read ({type(err).__name__}: {err})")
    if not isinstance(meta, dict):
        fail(path, f"must hold a JSON object, not {type(meta).__name__}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        fail(path, f"lacks {', '.join(missing)} (a meta.json written by save_model has them)")
    if not isinstance(meta["arch"], str) or not isinstance(meta["arch_kwargs"], dict):
        fail(path, "must give arch as a string and arch_kwargs as an object")
    digest = meta.get(HASH_KEY)
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        fail(path, f"has a {HASH_KEY} that is not a sha256 hex digest")
    try:
        problem = arch_problem(meta["arch"], meta["num_classes"], meta["in_shape"], meta["arch_kwargs"])
    except UserError as err:  # the architecture's own check, e.g. a ResNet depth that is not 6n+2
        problem = str(err).split("; ")[0]
    if problem is not None:
        fail(path, f"describes a model that is refused: {problem}")
    return meta


def load_model(path: str | os.PathLike, *, cure: str | None = None) -> LayeredNet:
    """Rebuild a saved model from a directory (or its ``model.safetensors``) with ``meta.json`` beside it.

    Nothing in the files is trusted: ``meta.json`` must be a JSON object with ``arch``, ``num_classes``,
    ``in_shape`` and ``arch_kwargs`` that pass the zoo's checks (known options, positive integers, a
    bounded parameter count, see :func:`paramtransfer.models.zoo.arch_problem`) before anything is built;
    the weights must match the ``weights_sha256`` recorded by :func:`save_model` and hold exactly the
    rebuilt architecture's tensors, with their shapes. A ``meta.json`` written before the hash existed
    (no ``weights_sha256``) is accepted without the hash check. Any failure is a :class:`UserError`
    naming the file and ``cure`` (default: re-save a user's directory; the exact ``paramtransfer pretrain
    ... --force`` command for a cached source).
    """
    p = Path(path).expanduser()
    d = _model_dir(p)
    if not (d / WEIGHTS).is_file() or not (d / META).is_file():
        raise UserError(
            f"no saved model at {path} (expected {WEIGHTS} and {META} there); save one with "
            "`paramtransfer pretrain --out DIR` or pt.save_model, or give a task spec such as fashion[0-4]"
        )

    def fail(file: Path, problem: str) -> NoReturn:
        raise UserError(f"{file} {problem}; {cure or _default_cure(d)}")

    meta = _read_meta(d, fail)
    weights = d / WEIGHTS
    try:
        data = weights.read_bytes()
    except OSError as err:
        fail(weights, f"cannot be read ({type(err).__name__}: {err})")
    if meta.get(HASH_KEY) is not None and hashlib.sha256(data).hexdigest() != meta[HASH_KEY]:
        fail(weights, f"does not match the {HASH_KEY} in {META} (changed or truncated after it was saved)")
    try:
        tensors = load_safetensors(data)
    except Exception as err:  # the parser's own error types; the bytes are not a safetensors file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        fail(weights, f"is not a readable safetensors file ({first})")
    model = build_model(
        meta["arch"], meta["num_classes"], in_shape=tuple(meta["in_shape"]), **meta["arch_kwargs"]
    )
    mismatch = _state_mismatch(model.state_dict(), tensors)
    if mismatch:
        fail(weights, f"does not fit the {meta['arch']} described in {META}: {mismatch}")
    model.load_state_dict(tensors)
    _restore_input(model, meta, fail, d / META)
    model.source_info = meta
    return model


def _restore_input(
    model: LayeredNet, meta: dict[str, Any], fail: Callable[[Path, str], NoReturn], path: Path
) -> None:
    """The input normalisation and class names that ``meta`` records (see ``LayeredNet.describe``)."""
    c = int(model.in_shape[0])
    for key in ("input_mean", "input_std"):
        value = meta.get(key)
        if value is None:
            continue
        ok = isinstance(value, list) and len(value) == c
        ok = ok and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
        )
        if not ok or (key == "input_std" and min(value) <= 0):
            fail(path, f"has a {key} that is not {c} finite numbers{' > 0' if key == 'input_std' else ''}")
        setattr(model, key, tuple(float(v) for v in value))
    names = meta.get("class_names")
    if names is not None:
        if not (
            isinstance(names, list)
            and len(names) == model.num_classes
            and all(isinstance(n, str) for n in names)
        ):
            fail(path, f"has class_names that are not {model.num_classes} strings")
        model.class_names = list(names)


def _state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What differs between two state dicts (names, shapes, dtypes), in one short phrase; '' if nothing."""

    def few(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    parts = []
    if missing:
        parts.append(f"missing tensors {few(missing)}")
    if extra:
        parts.append(f"unexpected tensors {few(extra)}")
    for k in sorted(set(expected) & set(found)):
        e, f = expected[k], found[k]
        if tuple(e.shape) != tuple(f.shape):
            parts.append(f"{k} has shape {list(f.shape)}, not {list(e.shape)}")
            break
        if e.dtype.is_floating_point != f.dtype.is_floating_point:
            parts.append(f"{k} has dtype {f.dtype}, not {e.dtype}")
            break
    return "; ".join(parts)


def saved_arch(path: str | os.PathLike) -> str | None:
    """The architecture recorded beside a saved model, or None if ``path`` is not a saved model (a task
    spec, see :func:`is_model_path`, or no readable ``meta.json``). The source ``torchvision:ARCH`` brings
    its architecture too: ``ARCH`` when the zoo has it."""
    if is_torchvision_source(path):
        arch = str(path).strip()[len(TORCHVISION_PREFIX) :]
        return arch if arch in TORCHVISION_ARCHS else None
    if isinstance(path, str) and not is_model_path(path):
        return None
    try:
        arch = json.loads((_model_dir(path) / META).read_text())["arch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return arch if isinstance(arch, str) else None


def source_key(arch: str, spec: str, **settings: Any) -> str:
    readable = re.sub(r"[^A-Za-z0-9]+", "-", f"{arch}-{spec}").strip("-")
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{readable}-{digest}"


def source_settings(
    spec: str,
    epochs: int = 3,
    seed: int = 0,
    limit: int | None = None,
    lr: float = 0.02,
    batch_size: int = 128,
    arch_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings that key a cached source (with its arch and spec, see :func:`source_key`)."""
    settings = {"epochs": epochs, "seed": seed, "limit": limit, "lr": lr, "batch_size": batch_size}
    settings["arch_kwargs"] = arch_kwargs or {}
    if not spec.strip().startswith("fashion"):
        # Datasets without an official test split changed their split rule (test images fixed per
        # dataset, not per class selection): a source cached under the old rule must not be reused.
        settings["test_split"] = "per-dataset"
    return settings
