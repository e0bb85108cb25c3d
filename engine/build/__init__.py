"""Build a Kiln engine directory from a Hugging Face or GGUF checkpoint.

    from engine.build import BuildOptions, build_engine
    engine_dir = build_engine("ckpt/", "my-engine/", BuildOptions(dtype="bfloat16"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.build.builder import BuildOptions, build_engine

__all__ = ["BuildOptions", "build_engine"]


def __getattr__(name: str) -> Any:
    # The builder imports torch; keep `import engine.build` light.
    if name in __all__:
        from engine.build import builder

        return getattr(builder, name)
    raise AttributeError(name)
