"""Prompt handling in the gateway: chat templating, token counting and the context-length check.

The gateway tokenizes with the same tokenizer files as the engine (the engine directory's), so
it can refuse a prompt that is too long with a 400 naming the limit before Triton sees it, and
choose a default `max_tokens` that fits. Token counts reported in `usage` still come from the
engine (through Triton), never from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.openai.errors import invalid_request

# OpenAI's default for /v1/completions; chat defaults to the rest of the context instead.
DEFAULT_COMPLETION_MAX_TOKENS = 16


class PromptProcessor:
    """Owns the tokenizer; renders chat prompts and fits requests into `max_seq_len`.

    `max_seq_len` is the engine's limit on prompt + generated tokens. The engine accepts a prompt
    of at most `max_seq_len - 1` tokens (one position must remain for the first new token).
    """

    def __init__(self, tokenizer: Any, max_seq_len: int, source: str) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.source = source

    @classmethod
    def from_dir(cls, tokenizer_dir: Path, max_seq_len: int) -> PromptProcessor:
        from transformers import AutoTokenizer

        from engine.errors import EngineLoadError

        if not (Path(tokenizer_dir) / "tokenizer_config.json").is_file() and not (
            Path(tokenizer_dir) / "tokenizer.json"
        ).is_file():
            raise EngineLoadError(
                f"{tokenizer_dir}: no tokenizer.json / tokenizer_config.json; pass --tokenizer "
                "with the engine directory (or the checkpoint it was built from)"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        return cls(tokenizer, max_seq_len, str(tokenizer_dir))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a chat request: the tokenizer's chat template with a generation
        prompt appended. No template -> 400 (never a made-up default format)."""
        if not self.has_chat_template:
            raise invalid_request(
                f"This model has no chat template (none in {self.source}/tokenizer_config.json); "
                "use /v1/completions with a formatted prompt instead",
                "messages",
                "chat_template_missing",
            )
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja2 errors raised by the template itself (e.g. role order)
            raise invalid_request(f"The chat template rejected the messages: {exc}", "messages") from None
        return str(text)

    def count_tokens(self, text: str) -> int:
        """Number of prompt tokens the engine will see for `text` (same call as the engine's)."""
        return len(self.tokenizer.encode(text))

    def fit_max_tokens(self, num_prompt_tokens: int, requested: int | None, default: int | None) -> int:
        """Check the prompt against the context limit and return the max_tokens to send.

        `requested` is the client's max_tokens (None when absent); `default` is used when absent
        (None: the rest of the context). Raises a 400 naming the limit when the prompt, or prompt
        plus requested tokens, do not fit.
        """
        limit = self.max_seq_len
        if num_prompt_tokens == 0:
            raise invalid_request("The prompt is empty; send at least one token of text", "prompt")
        if num_prompt_tokens > limit - 1:
            raise invalid_request(
                f"This model's maximum context length is {limit} tokens, and the prompt has "
                f"{num_prompt_tokens} tokens (at most {limit - 1}, leaving room for one generated token). "
                "Shorten the prompt.",
                "prompt",
                "context_length_exceeded",
            )
        room = limit - num_prompt_tokens
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise invalid_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, {requested} "
                f"for the completion). Reduce the prompt or max_tokens (at most {room} here).",
                "max_tokens",
                "context_length_exceeded",
            )
        return requested
