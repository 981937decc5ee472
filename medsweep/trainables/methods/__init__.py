"""PETL methods, one module each, registered by name when this package is imported.

Every public module in this folder is imported here, so adding a method is
adding one file that ends with ``register_method(...)`` (see CONTRIBUTING.md).
Modules whose name starts with an underscore are shared machinery.
"""

import importlib
import pkgutil

from medsweep.trainables.methods.base import (
    ImageInput,
    Method,
    MethodConfig,
    build_method,
    get_method,
    list_methods,
    make_config,
    register_method,
    runs_ddp,
)

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ImageInput",
    "Method",
    "MethodConfig",
    "build_method",
    "get_method",
    "list_methods",
    "make_config",
    "register_method",
    "runs_ddp",
]
