"""Transfer strategies, one module each, registered by name in :data:`METHODS`."""

from paramtransfer.methods import (  # noqa: F401  (registration)
    baselines,
    delta,
    dtnh,  # noqa: F401, I001  (after the regularisers: adds their dtnh: twins)
    ptu,
    regularizers,
)
from paramtransfer.methods.base import METHODS, Method, MethodConfig, list_methods, make_method

__all__ = ["METHODS", "Method", "MethodConfig", "list_methods", "make_method"]
