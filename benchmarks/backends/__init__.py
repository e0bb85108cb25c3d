"""Load-generator backends: `triton-grpc`, `triton-http`, `openai`, `openai-chat`.

`make_backend(name, BackendOptions(url=..., model=...))` returns one; see `base.Backend` for
the contract every backend keeps. Client libraries are imported when a backend starts.
"""

from benchmarks.backends import openai, triton  # noqa: F401 - registers the built-in backends
from benchmarks.backends.base import BACKENDS, Backend, BackendOptions, make_backend

__all__ = ["BACKENDS", "Backend", "BackendOptions", "make_backend"]
