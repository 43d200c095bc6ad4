"""User-facing errors: a bad input, not a bug. The CLI prints them as one line."""


class DKGMError(ValueError):
    """An input problem the user can fix (bad value, missing file, wrong shape)."""
