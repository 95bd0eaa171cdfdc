"""Errors the harness raises for bad input; each message names the thing at fault."""


class BenchError(Exception):
    """Base class: a problem with the user's input or configuration, not a bug."""


class AdapterError(BenchError):
    """An adapter folder, file or pool is missing, corrupt or incompatible."""


class ConfigError(BenchError):
    """A configuration value is invalid."""


class DataError(BenchError):
    """A data set is missing or malformed."""
