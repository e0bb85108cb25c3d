"""Errors the benchmark harness raises on purpose; the CLI prints them as one line."""

from __future__ import annotations

from engine.errors import KilnError


class BenchmarkError(KilnError):
    """A benchmark cannot run as configured (bad flag, unreadable dataset, unreachable server)."""
