"""The error a config that cannot run raises (kept apart from config.py, which imports the methods
that raise it)."""


class ConfigError(ValueError):
    """A config that cannot run; the message lists every offending field."""
