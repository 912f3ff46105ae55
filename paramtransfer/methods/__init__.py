"""Transfer strategies, one module each, registered by name in :data:`METHODS`."""

from paramtransfer.methods import baselines, ptu, regularizers  # noqa: F401  (registration)
from paramtransfer.methods.base import METHODS, Method, MethodConfig, list_methods, make_method

__all__ = ["METHODS", "Method", "MethodConfig", "list_methods", "make_method"]
