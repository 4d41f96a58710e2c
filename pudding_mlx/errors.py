"""Errors that the CLI reports as one line (exit code 2) instead of a traceback."""


class PuddingError(Exception):
    """A user-facing error: bad input, a broken file, an impossible request."""


class BundleError(PuddingError):
    """A bundle folder or its manifest is inconsistent; the message names the file."""
