"""The method interface: a source LayeredNet + a target class count -> a trainable model and its loss.

A method is a small class with a config dataclass, registered by name in :data:`METHODS`. The trainer
knows nothing about methods beyond this interface:

* :meth:`Method.build` makes the target model (and freezes what must not train);
* :meth:`Method.param_groups` lists the parameters the optimizer steps (with optional ``lr_mult``);
* :meth:`Method.loss_terms` returns named loss terms, already multiplied by their coefficients
  (``{"task": ce, "reg": ...}``); the trainer sums them, DTNH uses the split;
* :meth:`Method.backward` turns the terms into ``.grad`` (the default sums them; DTNH overrides it);
* :meth:`Method.diagnostics` reports method-specific measurements after training.

Methods that do not train by gradient descent (K-NN, random guess) set ``trains = False`` and
implement :meth:`Method.fit_evaluate` instead.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from paramtransfer.errors import UserError
from paramtransfer.models.layered import LayeredNet, freeze, unfreeze
from paramtransfer.models.zoo import build_model
from paramtransfer.registry import Registry
from paramtransfer.runtime import Runtime


class _MethodRegistry(Registry["type[Method]"]):
    def get(self, name: str) -> type[Method]:
        if name.startswith("dtnh:") and name not in self:
            twins = ", ".join(n for n in self.names() if n.startswith("dtnh:"))
            raise UserError(
                f"unknown method {name!r}: DTNH corrects the gradient of a regulariser towards the source, "
                f"which {name[5:]!r} does not have; use one of {twins}"
            )
        return super().get(name)


METHODS: Registry[type[Method]] = _MethodRegistry("method")


@dataclass
class MethodConfig:
    """Base of every method's config; subclasses add their own fields with defaults."""


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name``."""

    def add(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return add


class Method:
    """Base class of every transfer strategy (see the module docstring for the contract)."""

    name: ClassVar[str] = "method"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    trains: ClassVar[bool] = True
    needs_source: ClassVar[bool] = True
    regularized: ClassVar[bool] = False  # has loss terms besides "task" (then ``dtnh:<name>`` exists)
    # the trainer then calls loss_terms(..., index=i) with the batch's row indices into task.train
    wants_batch_index: ClassVar[bool] = False
    # loss_terms and predict only call model(x) on a LayeredNet: the trainer may then feed the output of
    # the model's frozen first blocks, computed once (TrainConfig.prefix_cache_mb)
    prefix_cacheable: ClassVar[bool] = False
    supported_archs: ClassVar[tuple[str, ...] | None] = None  # None: any LayeredNet
    arch_advice: ClassVar[str] = ""  # appended to the error of check_arch, e.g. ", or ptu_rnn for rnn"

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()
        # device, precision and augmentation of the run; the trainer (or the run, for methods that do
        # not train) sets it before ``prepare`` / ``fit_evaluate``
        self.runtime = Runtime()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def check_arch(cls, arch: str) -> None:
        """Refuse an architecture this method cannot run on, from its name alone (cheap: called before
        a source is pretrained). ``build`` still checks the actual source."""
        if cls.supported_archs is None or arch in cls.supported_archs:
            return
        zoo = [a for a in cls.supported_archs if a not in ("custom", "wrapped")]
        raise UserError(
            f"method {cls.name!r} runs on {', '.join(zoo)}, not on {arch}; "
            f"use --arch {zoo[0]}{cls.arch_advice}"
        )

    def build(
        self, source: LayeredNet | None, num_classes: int, *, arch: str, in_shape: tuple, seed: int
    ) -> nn.Module:
        """The target model. Default: a copy of the source with a fresh head, everything trainable."""
        return transfer_copy(self._require_source(source), num_classes, seed)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer; a group may carry ``lr_mult`` (default 1)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def prepare(self, model: nn.Module, task: Any) -> None:
        """Called by the trainer before the first step (and again on resume), with the target task;
        for set-up that needs the training data (e.g. DELTA's channel attention). Must be deterministic."""

    # ---- one training step --------------------------------------------------------------------
    def loss_terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"task": F.cross_entropy(model(x), y)}

    def backward(self, terms: dict[str, torch.Tensor], model: nn.Module) -> None:
        """Write the update direction into ``.grad`` (default: gradient of the summed terms)."""
        sum(terms.values()).backward()

    # ---- evaluation ---------------------------------------------------------------------------
    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def diagnostics(self, model: nn.Module, task: Any) -> dict[str, Any]:
        return {}

    def epoch_stats(self) -> dict[str, Any]:
        """Measurements of the epoch just trained, merged into its history record (and so kept in the
        checkpoint across a resume); the method resets its counters here."""
        return {}

    def summarize_history(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """Diagnostics computed from the whole history (e.g. from :meth:`epoch_stats`)."""
        return {}

    def export(self, model: nn.Module) -> nn.Module:
        """The deployable target network (default: the trained model itself)."""
        return model

    def fit_evaluate(self, source: LayeredNet | None, task: Any, seed: int) -> dict[str, Any]:
        """For ``trains = False``: returns ``val_accuracy``, ``test_accuracy`` and ``diagnostics``."""
        raise TypeError(f"{self.name} trains by gradient descent; use the trainer")

    # ---- naming and variants ------------------------------------------------------------------
    def variant(self) -> str:
        """``name`` plus the options that differ from the defaults, e.g. ``finetune[freeze=2]``."""
        diff = changed_options(self.config)
        if not diff:
            return self.name
        return f"{self.name}[{','.join(f'{k}={_fmt(v)}' for k, v in diff.items())}]"

    @classmethod
    def expand(cls, options: dict[str, Any], source: LayeredNet | None) -> list[dict[str, Any]]:
        """Turn one method spec's options into the variants it stands for (default: itself)."""
        return [options]

    def _require_source(self, source: LayeredNet | None) -> LayeredNet:
        if source is None:
            raise UserError(
                f"method {self.name!r} transfers from a source; give --source (a spec or a saved model)"
            )
        return source


def _fmt(v: Any) -> str:
    if isinstance(v, list | tuple):  # written so that the variant name parses back as a method spec
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def changed_options(config: MethodConfig) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        value = getattr(config, f.name)
        if value != default:
            out[f.name] = value
    return out


def transfer_copy(source: LayeredNet, num_classes: int, seed: int) -> LayeredNet:
    """A deep copy of ``source`` with a freshly initialised head (seeded), all parameters trainable."""
    model = copy.deepcopy(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.reset_head(num_classes)
    unfreeze(model)  # a source that was frozen (a frozen copy, a linear probe's net) transfers whole
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.source_statistics = True  # its running statistics are the source's (TrainConfig.bn)
    return model


def fresh_model(
    source: LayeredNet | None, num_classes: int, arch: str | None, in_shape: tuple, seed: int
) -> LayeredNet:
    """A randomly initialised net of the source's architecture (or ``arch`` when there is no source)."""
    if source is not None:
        if source.arch in ("custom", "wrapped"):
            model = copy.deepcopy(source)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for m in model.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
                model.reset_head(num_classes)
            unfreeze(model)
            return model
        return build_model(
            source.arch, num_classes, in_shape=source.in_shape, seed=seed, **source.arch_kwargs
        )
    if arch is None:
        raise UserError("training from scratch needs --arch (or a --source whose architecture to copy)")
    return build_model(arch, num_classes, in_shape=in_shape, seed=seed)


def frozen_copy(source: LayeredNet) -> LayeredNet:
    """A real copy of ``source`` (no shared storage) that never trains."""
    frozen = copy.deepcopy(source)
    freeze(frozen)
    return frozen


def trainable(model: nn.Module) -> Iterator[nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)


# ---- method specs: "name[k=v,k=v]" -------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A config value from text: numbers, booleans, null, lists (YAML flow syntax), else a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"finetune[freeze=2]"`` -> ``("finetune", {"freeze": 2})``.

    Example:
        >>> parse_method_spec("l2sp[alpha=0.1,beta=0.01]")
        ('l2sp', {'alpha': 0.1, 'beta': 0.01})
    """
    spec = spec.strip()
    if "[" not in spec:
        return spec, {}
    if not spec.endswith("]"):
        raise UserError(f"cannot read method {spec!r}; write name[key=value,...], e.g. finetune[freeze=2]")
    name, _, body = spec[:-1].partition("[")
    options: dict[str, Any] = {}
    for part in split_method_list(body):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise UserError(f"cannot read option {part!r} of method {spec!r}; write key=value")
        options[key.strip()] = parse_value(value.strip())
    return name.strip(), options


def split_method_list(text: str) -> list[str]:
    """Split ``"scratch,finetune[freeze=1,last_k=2],l2sp"`` on the commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out if s.strip()]


def make_config(cls: type[MethodConfig], options: dict[str, Any], where: str) -> MethodConfig:
    """Build a config dataclass from options, with an error naming the known fields."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in options:
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise UserError(f"{where} has no option {key!r}; its options: {known}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise UserError(f"bad options for {where}: {err}") from None


def make_method(spec: str | Method, **options: Any) -> Method:
    """A method instance from a spec string (``"finetune[freeze=2]"``) plus keyword options."""
    if isinstance(spec, Method):
        return spec
    name, spec_options = parse_method_spec(spec)
    cls = METHODS.get(name)
    return cls(make_config(cls.Config, {**spec_options, **options}, f"method {name!r}"))


def check_method(spec: str | Method, arch: str | None, **options: Any) -> Method:
    """The method of ``spec`` (its options validated) after checking it runs on ``arch``.

    Everything here is cheap and needs no source: commands call it before a source is resolved, so
    that a mismatch fails in a moment instead of after pretraining the source.
    """
    method = make_method(spec, **options)
    if arch is not None:
        type(method).check_arch(arch)
    return method


def list_methods() -> list[str]:
    return METHODS.names()
