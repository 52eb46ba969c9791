"""Typed errors raised at the edges: config resolution, artifact loading, request parsing.

Every message names the value, the limit (and where it comes from) and the fix. The CLI prints
`DgemmaError`s without a traceback; anything else is a bug and keeps its traceback.
"""


class DgemmaError(Exception):
    """Base of every user-facing error."""


class ConfigError(DgemmaError):
    """A configuration value (flag, config.json field, generation setting) is invalid."""


class ArtifactError(DgemmaError):
    """A file or directory the stage needs is missing, incomplete, corrupt or stale."""


class CheckpointError(ArtifactError):
    """A checkpoint directory does not match the DiffusionGemma layout."""


class RequestError(DgemmaError):
    """A generation request is invalid (prompt too long, bad max_new_tokens, ...)."""


class Busy(RequestError):
    """The server is full: every batch row is taken and the queue is full (Triton UNAVAILABLE, HTTP 503)."""


class Cancelled(DgemmaError):
    """Generation was cancelled by the caller's should_stop() hook."""
