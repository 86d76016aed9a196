"""The one error base for everything farm tells a user: the CLI prints its message on one line.

It sits below every layer (it imports nothing), so tools, specs and the driver can all
derive from it without an import reaching upward.
"""

from __future__ import annotations

# Exit codes (cli.py): 2 for input refused before anything rendered (a wrong spec, option or
# model), 1 when the job ran but some of it failed.
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class FarmError(Exception):
    """A problem phrased for the user in one line; ``farm`` prints it and exits with ``exit_code``."""

    exit_code = EXIT_BAD_INPUT
