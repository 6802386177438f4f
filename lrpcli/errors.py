"""Errors that reach the user as one clear line.

Anything raised as ``LrpcliError`` (or a subclass) is printed by the CLI as ``lrpcli: error: <message>`` with
exit code 2 and no traceback (``--debug`` shows it). Messages name the file, key or value at fault and what
is allowed.
"""


class LrpcliError(Exception):
    """Bad input or usage: printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(LrpcliError):
    """A config file or value is wrong; the message starts with the key path."""


class DataError(LrpcliError):
    """The data folder, an image or an output file is wrong."""


class RunError(LrpcliError):
    """The run failed after it started (exit code 1)."""

    exit_code = 1


class UnmatchedPatternError(ConfigError, ValueError):
    """A module-name glob of a rule override matches no module of the model (it would do nothing).

    Raised when a composite is applied to a model; also a ValueError for Python API callers.
    """


class ConfigWarning(UserWarning):
    """A config is valid but has keys that do nothing in this run (printed as one ``lrpcli: warning:`` line)."""
