"""A tiny name -> object registry, used for models, methods and transferability scores."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from paramtransfer.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise a :class:`UserError` that lists the known ones.

    Example:
        >>> MODELS = Registry("model")
        >>> @MODELS.register("lenet")
        ... def lenet(num_classes: int) -> Any: ...
        >>> MODELS.get("lenet") is lenet
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise UserError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
