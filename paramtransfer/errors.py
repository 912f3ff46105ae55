"""The one exception type for bad user input.

The CLI turns a :class:`UserError` into a single line on stderr and exit code 2; the library lets it
propagate so that callers can catch it. Its message always says what to do instead.
"""


class UserError(ValueError):
    """Bad input a user can fix (unknown name, bad spec, missing data, shape mismatch)."""
