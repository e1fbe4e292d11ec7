"""The one error family of mhmoe: bad input (config, flag, data file, checkpoint) that the user can fix.

Each carries a one-line message that names the field and the fix; the command line prints it without a
traceback and exits with `exit_code`. The library raises them; only `mhmoe.cli` turns them into exit codes.
"""

from __future__ import annotations


class MhmoeError(Exception):
    """Base of every user-facing error; the message is one line naming the field and the fix."""

    exit_code = 2


class UserError(MhmoeError):
    """An error in what the user asked for (a flag, a path, a run directory)."""


class ConfigError(MhmoeError, ValueError):
    """A config value or key is invalid; the message names the field and the fix."""


class DataError(MhmoeError, ValueError):
    """A data file, corpus name or data setting is unusable; the message names it and the fix."""


class CheckpointError(MhmoeError, ValueError):
    """No usable checkpoint where one was required; the message says where and what to do."""


class TrainingError(MhmoeError, RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the run directory keeps its last good checkpoint."""
