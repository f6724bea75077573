"""RL methods (``rl.method``), one module each, registered in :data:`METHODS` (see :mod:`.base`).

Importing this package imports every module in it, so a new method is one new file here (plus its tests).
"""

import importlib
import pkgutil

from .base import METHODS, Objective, PolicyMethod, get_method, per_row, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Objective", "PolicyMethod", "get_method", "per_row", "register"]
