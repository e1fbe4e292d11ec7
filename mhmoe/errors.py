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
