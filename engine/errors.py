"""Exceptions raised at Kiln's edges, each with a message a user can act on."""

from __future__ import annotations


class KilnError(Exception):
    """Base class of every error Kiln raises on purpose (CLI prints these as one line)."""


class CheckpointError(KilnError):
    """A Hugging Face / GGUF / ModelOpt checkpoint is missing, malformed or unsupported."""


class BuildError(KilnError):
    """`build-engine` could not produce an engine (bad flags, impossible sharding, accuracy gate)."""


class EngineLoadError(KilnError):
    """An engine directory is missing a file, has the wrong format or inconsistent contents."""


class InvalidRequestError(KilnError, ValueError):
    """A request's prompt or sampling parameters are invalid (maps to HTTP 400)."""
