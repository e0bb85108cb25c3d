"""Moved to engine.build.prompt_table (the engine builder reads prompt tables)."""

from engine.build.prompt_table import PROMPT_PEFT_TYPES, load_prompt_embeddings

__all__ = ["PROMPT_PEFT_TYPES", "load_prompt_embeddings"]
