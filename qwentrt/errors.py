"""Errors a person can act on: each carries one line that names the problem and, where there is
one, the fix. The CLI prints the line and exits non-zero; no traceback for these."""


class QwentrtError(Exception):
    """Base class: the message is shown to the user as it is."""


class CheckpointError(QwentrtError):
    """A checkpoint is missing, unreadable, corrupt, or not a model we support."""


class ConfigError(QwentrtError):
    """A configuration (config.json, engine.json, build options) is invalid."""


class BuildError(QwentrtError):
    """Building an engine failed for a reason other than the checkpoint itself."""
