"""Errors that the CLI reports as one line (exit code 2) instead of a traceback."""


class PuddingError(Exception):
    """A user-facing error: bad input, a broken file, an impossible request."""


class BundleError(PuddingError):
    """A bundle folder or its manifest is inconsistent; the message names the file."""


def one_line(error: BaseException) -> str:
    """The message on one line, even when it quotes a multi-line error from a library;
    errors other than PuddingError keep their type name in front."""
    text = str(error) if isinstance(error, PuddingError) else f"{type(error).__name__}: {error}"
    return " ".join(line.strip() for line in text.splitlines())
