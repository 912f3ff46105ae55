"""Transfer strategies, one module each, registered by name in :data:`METHODS`.

May import: errors, registry, data, models, optim.
"""

from paramtransfer.methods import (  # noqa: F401
    baselines,
    bi_tuning,
    bitfit,
    bss,
    co_tuning,
    delta,
    dtnh,
    lora,
    lwf,
    ptu,
    regularizers,
    spottune,
    stochnorm,
)
from paramtransfer.methods.base import METHODS, Method, MethodConfig, list_methods, make_method

dtnh.register_twins()  # after every module above has registered its methods

__all__ = ["METHODS", "Method", "MethodConfig", "list_methods", "make_method"]
