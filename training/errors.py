"""Errors the training module raises at its edge; the CLI prints each as one line."""

from __future__ import annotations

from engine.errors import KilnError


class TrainingError(KilnError):
    """`kiln finetune` cannot run as asked: a bad flag, an unusable model or output directory."""


class DataError(TrainingError):
    """A training or validation jsonl file is unusable; the message names the file and line numbers."""


class TrainingInterrupted(TrainingError):
    """Training stopped on Ctrl-C after saving a resumable checkpoint."""
