"""One record per method: what the search knows about it, in the method's own file.

Each public module here (``<name>.py``, named after the method it describes)
defines ``SPACE``, a :class:`~medsweep.spaces._record.MethodSpace`: the rules
of the method's config fields, its recommended point and the source of every
value, the distributions searched around it, and any checks of several keys.
The package imports every public module, so adding a method's search facts is
adding one file; ``_``-prefixed modules hold what several records share (the
FPT family's keys). Published tables that several methods draw on stay in
:mod:`medsweep.spaces.tables`.

The training side registers the same name in ``medsweep.trainables``; the
tests check that both registries list the same methods and that a record's
rules cover exactly the fields of the method's config. Nothing else in the
package names a method.
"""

from __future__ import annotations

import importlib
import pkgutil

from medsweep.errors import ConfigError
from medsweep.spaces._record import MethodSpace


def _discover() -> dict[str, MethodSpace]:
    records = []
    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("_"):
            continue
        record = importlib.import_module(f"{__name__}.{module.name}").SPACE
        if record.name != module.name:
            raise ValueError(f"spaces/methods/{module.name}.py describes {record.name!r}; name the file after the method")
        records.append(record)
    return {record.name: record for record in sorted(records, key=lambda r: (r.order, r.name))}


RECORDS: dict[str, MethodSpace] = _discover()
METHODS: tuple[str, ...] = tuple(RECORDS)


def record(method: str) -> MethodSpace:
    """The record of ``method``, else a ConfigError naming every known method."""
    if method not in RECORDS:
        raise ConfigError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    return RECORDS[method]


__all__ = ["METHODS", "RECORDS", "record"]
