"""Typed errors for bad user input.

Every error a user can fix by changing their command or their files derives
from :class:`MedsweepError`. The CLI prints its message as one line and exits
with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MedsweepError(Exception):
    """Bad input the user can fix; the message must name the fix."""


class ConfigError(MedsweepError):
    """An invalid method, space, search or training setting."""


class DatasetError(MedsweepError):
    """A dataset folder, file or image that cannot be used as given."""


class StoreError(MedsweepError):
    """A preload store that is missing, stale or corrupt beyond repair."""
