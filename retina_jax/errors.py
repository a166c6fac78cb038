"""The errors that are a user's mistake rather than a bug (kept apart from config.py, which imports
the methods that raise them). The command line (retina_jax/commands.py) reports each as one
`error:` line with exit code 2; every other exception keeps its traceback."""


class UserError(Exception):
    """A mistake in what the user gave (config, flags, files); the message names it and the fix."""


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message lists every offending field."""


class CheckpointError(UserError, FileNotFoundError):
    """A checkpoint that is not there (no run yet, a step not kept) or a directory that is not one."""
