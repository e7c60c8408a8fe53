"""The one exception type users see: a bad input, reported on one line."""


class QSMInputError(ValueError):
    """Bad user input (file, shape, units, parameter). ``str(err)`` is one line naming the problem.

    The command line prints ``qsmkit: error: <message>`` and exits with status 2.
    """

    def __init__(self, message, path=None):
        message = " ".join(str(message).split())  # always one line
        if path is not None:
            message = f"{path}: {message}"
        super().__init__(message)
        self.path = path


class QSMWarning(UserWarning):
    """An input that is unusual but possible (a long TE, a low B0, range-scaled phase).

    The command line prints it as one line ``qsmkit: warning: <message>`` on stderr."""


def warn(message, path=None) -> None:
    """Issue a one-line :class:`QSMWarning` (``path:`` first when given)."""
    import warnings

    message = " ".join(str(message).split())
    warnings.warn(f"{path}: {message}" if path is not None else message, QSMWarning, stacklevel=3)
