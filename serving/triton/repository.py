"""Write a Triton model repository that serves a Kiln engine (`kiln repo`).

    repo/
      ensemble/                 # --model-name (TensorRT-LLM's default name, so clients work unchanged)
        config.pbtxt            # from model_repo/ensemble/config.pbtxt, tensors from request.py
        1/model.py              # a two-line shim importing serving.triton.model

The engine is referenced by absolute path (config.pbtxt parameter `engine_dir`), not copied.
`engine_dir` may also be a Hugging Face checkpoint: the `backend` parameter (chosen by
`serving.backends.choose_backend`, with its `backend_reason`) says what serves it.
"""

from __future__ import annotations

import re
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

import model_repo
from engine.build.options import BuildOptions
from engine.config import is_engine_dir, load_engine_config
from engine.errors import KilnError
from serving.backends import BackendChoice, choose_backend
from serving.triton.request import DEFAULT_MAX_TOKENS, INPUTS, OUTPUTS, TensorSpec

TEMPLATE_DIR = Path(model_repo.__file__).parent / "ensemble"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RepositoryError(KilnError):
    """The model repository cannot be written (bad option, output in the way)."""


@dataclass(frozen=True)
class RepoOptions:
    """How the model is served. `max_queue_delay_us` lets Triton's dynamic batcher hold a
    request that long to hand execute() several at once (the engine batches in flight anyway,
    so 0 is right unless execute() overhead matters); each of `instance_count` instances loads
    its own copy of the engine."""

    model_name: str = "ensemble"
    decoupled: bool = True
    max_queue_delay_us: int = 0
    instance_count: int = 1
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    backend: str = "auto"  # auto | kiln | vllm | hf (serving.backends)

    def __post_init__(self) -> None:
        if not _MODEL_NAME.match(self.model_name):
            raise RepositoryError(
                f"--model-name {self.model_name!r}: use letters, digits, '_', '.', '-' (starting with a letter or digit)"
            )
        if self.max_queue_delay_us < 0:
            raise RepositoryError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}")
        if self.instance_count < 1:
            raise RepositoryError(f"--instance-count must be >= 1, got {self.instance_count}")
        if self.default_max_tokens < 1:
            raise RepositoryError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")


def _pbtxt_string(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _render_tensor(spec: TensorSpec, with_optional: bool) -> str:
    dims = ", ".join(str(d) for d in spec.dims)
    lines = [f'    name: "{spec.name}"', f"    data_type: {spec.data_type}", f"    dims: [ {dims} ]"]
    if with_optional and spec.optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def render_config(engine_dir: Path, options: RepoOptions, choice: BackendChoice | None = None) -> str:
    """config.pbtxt for `engine_dir` (validated) with `options`, served by `choice` (default:
    `choose_backend(engine_dir, options.backend)`)."""
    choice = choice or choose_backend(engine_dir, options.backend)
    if is_engine_dir(engine_dir):
        max_batch_size = load_engine_config(engine_dir).build.max_batch_size
    else:
        max_batch_size = BuildOptions().max_batch_size
    template = string.Template((TEMPLATE_DIR / "config.pbtxt").read_text())
    return template.substitute(
        model_name=options.model_name,
        max_batch_size=max_batch_size,
        decoupled="true" if options.decoupled else "false",
        max_queue_delay_us=options.max_queue_delay_us,
        inputs=",\n".join(_render_tensor(spec, with_optional=True) for spec in INPUTS),
        outputs=",\n".join(_render_tensor(spec, with_optional=False) for spec in OUTPUTS),
        instance_count=options.instance_count,
        engine_dir=_pbtxt_string(str(Path(engine_dir).resolve())),
        default_max_tokens=options.default_max_tokens,
    ) + "".join(
        f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{_pbtxt_string(value)}" }}\n}}\n'
        for key, value in (("backend", choice.name), ("backend_reason", choice.reason))
    )


def write_model_repository(
    engine_dir: str | Path, output_dir: str | Path, options: RepoOptions | None = None, force: bool = False,
    choice: BackendChoice | None = None,
) -> Path:
    """Write (or, with `force`, replace) the model `options.model_name` under `output_dir`.

    Other models already in `output_dir` are left alone, so several engines can share one
    repository. Returns the model's directory. Raises EngineLoadError for a bad engine and
    RepositoryError when the model directory exists and `force` is False.
    """
    options = options or RepoOptions()
    engine_dir = Path(engine_dir)
    config_text = render_config(engine_dir, options, choice)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RepositoryError(f"-o {output_dir}: exists and is not a directory")
    model_dir = output_dir / options.model_name
    if model_dir.exists():
        if not force:
            raise RepositoryError(f"{model_dir} already exists; pass --force to replace it")
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config_text)
    shutil.copyfile(TEMPLATE_DIR / "1" / "model.py", model_dir / "1" / "model.py")
    return model_dir


def find_models(repository: str | Path) -> list[str]:
    """Names of the models in a repository (subdirectories with a config.pbtxt)."""
    root = Path(repository)
    return sorted(p.parent.name for p in root.glob("*/config.pbtxt"))


def read_backend(model_dir: str | Path) -> str:
    """The backend a Kiln model directory names (config.pbtxt `backend`; "kiln" if absent)."""
    text = (Path(model_dir) / "config.pbtxt").read_text()
    match = re.search(r'key:\s*"backend"\s*value:\s*\{\s*string_value:\s*"([a-z]+)"', text)
    return match.group(1) if match else "kiln"


def read_engine_dir(model_dir: str | Path) -> Path:
    """The engine a Kiln model directory serves (its config.pbtxt `engine_dir` parameter)."""
    config = Path(model_dir) / "config.pbtxt"
    match = re.search(r'key:\s*"engine_dir"\s*value:\s*\{\s*string_value:\s*"((?:[^"\\]|\\.)*)"', config.read_text())
    if match is None:
        raise RepositoryError(f"{config}: no engine_dir parameter (not a Kiln model)")
    return Path(match.group(1).replace('\\"', '"').replace("\\\\", "\\"))
