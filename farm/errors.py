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


class RunFailed(FarmError):
    """The job started rendering but could not finish (its rows could not be written, another run
    took its folder): exit 1, and the message says what is safe and that a rerun finishes it."""

    exit_code = EXIT_FAILED


class FatalRenderError(FarmError):
    """An actor's error that the same batch would meet again on any retry (an output folder that
    cannot be written, a model file that is missing): the driver fails the batch at once instead
    of rendering it again. The message is the row's error.

    ``write_error`` is the OSError when every write of the run would fail alike (the disk or the
    quota full, the folder read-only or refused): the driver then sends no more work. It is an
    attribute, not the ``__cause__``, so that it crosses Ray (an exception pickles its ``__dict__``).
    """

    exit_code = EXIT_FAILED

    def __init__(self, message: str, write_error: OSError | None = None) -> None:
        super().__init__(message)
        self.write_error = write_error


class BatchFailed(FarmError):
    """A batch's render raised (any error but farm's own, which travel as they are): its message, in
    a form that always crosses Ray, so one batch of several sent in one call fails on its own."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, a scheduler), raised where Ctrl-C raises KeyboardInterrupt, so a
    render ends the same way (finished batches saved, lock released, Ray shut down) and the CLI
    can still tell the two apart (exit 143, not 130)."""
