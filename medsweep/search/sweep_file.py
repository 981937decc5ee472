"""A sweep as a file: read ``medsweep sweep --config FILE``, write ``--print-config``.

The file holds :class:`~medsweep.search.settings.SweepSettings` fields under their own names, the
names ``sweep.json`` uses, so a finished sweep's ``sweep.json`` is itself a sweep file: YAML
(``.yaml``/``.yml``) or JSON (``.json``). ``--print-config`` prints the resolved settings in the same
form. A key this medsweep does not know is refused in one line naming the nearest known one, before
anything starts: a misspelt key silently ignored would run a different sweep than the file says.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from medsweep.errors import ConfigError
from medsweep.search.settings import SweepSettings

SUFFIXES = (".yaml", ".yml", ".json")


def setting_names() -> tuple[str, ...]:
    """Every key a sweep file may hold: the fields of :class:`SweepSettings`."""
    return tuple(f.name for f in fields(SweepSettings))


def read_sweep_file(path: Path) -> dict[str, Any]:
    """The settings a sweep file gives (only the keys it holds), checked for unknown keys."""
    import yaml

    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"--config {path}: a sweep file ends in .yaml, .yml or .json (see `medsweep sweep --print-config`)")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"--config {path} is not valid {path.suffix[1:].upper()}: {str(error).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: a sweep file maps setting names to values, got {type(values).__name__}")
    known = setting_names()
    for key in values:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"--config {path}: unknown setting {key!r}; {hint}`medsweep sweep --print-config` lists every setting")
    if not isinstance(values.get("fixed", {}), dict):
        raise ConfigError(f"--config {path}: fixed maps keys to values (fixed: {{lr: 0.01}}), got {values['fixed']!r}")
    if isinstance(values.get("methods"), str):  # `methods: lora` means the one method, not its letters
        values["methods"] = [values["methods"]]
    return values


def sweep_file_text(settings: SweepSettings) -> str:
    """The resolved settings as a YAML sweep file: every setting, the values ``sweep.json`` holds."""
    import yaml

    return yaml.safe_dump(json.loads(settings.to_json()), sort_keys=False)
