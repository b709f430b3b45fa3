"""Errors a user can act on: each says what was wrong, where, and what is expected."""


class FairdistillError(Exception):
    """Base class of every error fairdistill raises on purpose."""


class ConfigError(FairdistillError):
    """A configuration value (file, key or override) is invalid."""


class DataError(FairdistillError):
    """A data set on disk is missing, unreadable or inconsistent."""


class TrainingError(FairdistillError):
    """Training cannot go on (NaN loss, bad labels); the last good checkpoint is kept."""


class RunDirError(FairdistillError):
    """A run directory is in a state that forbids the requested action."""
