"""The one base exception of clickvec: every error raised on purpose derives from it,
so an entry point can print it as one line without a traceback."""


class ClickvecError(Exception):
    """Base class of every error clickvec raises on purpose."""

