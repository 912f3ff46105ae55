"""The one exception type for bad user input, and the one way to warn a user.

The CLI turns a :class:`UserError` into a single line on stderr and exit code 2; the library lets it
propagate so that callers can catch it. Its message always says what to do instead.

:func:`warn_user` is for input that is usable but probably not what the user meant (the run goes on):
one line ``paramtransfer: warning: ...`` on stderr that names the problem and the cure.
"""

from __future__ import annotations

import sys


class UserError(ValueError):
    """Bad input a user can fix (unknown name, bad spec, missing data, shape mismatch)."""


def warn_user(message: str) -> None:
    """One line on stderr: ``paramtransfer: warning: <message>``."""
    print(f"paramtransfer: warning: {message}", file=sys.stderr, flush=True)
