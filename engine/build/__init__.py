"""Build a Kiln engine directory from a Hugging Face or GGUF checkpoint.

    from engine.build import BuildOptions, build_engine
    engine_dir = build_engine("ckpt/", "my-engine/", BuildOptions(dtype="bfloat16"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.build.builder import build_engine
    from engine.build.options import BuildOptions

__all__ = ["BuildOptions", "build_engine"]


def __getattr__(name: str) -> Any:
    # The builder imports torch; keep `import engine.build` light.
    if name == "BuildOptions":
        from engine.build.options import BuildOptions

        return BuildOptions
    if name == "build_engine":
        from engine.build.builder import build_engine

        return build_engine
    raise AttributeError(name)
