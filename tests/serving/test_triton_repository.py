"""`kiln repo`: the model repository written for an engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_engine_config
from engine.errors import EngineLoadError
from serving.triton.repository import (
    RepoOptions,
    RepositoryError,
    find_models,
    read_engine_dir,
    write_model_repository,
)
from serving.triton.request import INPUTS, OUTPUTS


def test_repository_declares_every_tensor_and_the_engine(tiny_engine: Path, tmp_path: Path) -> None:
    model_dir = write_model_repository(tiny_engine, tmp_path / "repo")
    config = (model_dir / "config.pbtxt").read_text()
    assert model_dir.name == "ensemble" and find_models(tmp_path / "repo") == ["ensemble"]
    assert 'backend: "python"' in config and "decoupled: true" in config
    assert f"max_batch_size: {load_engine_config(tiny_engine).build.max_batch_size}" in config
    for spec in (*INPUTS, *OUTPUTS):
        assert f'name: "{spec.name}"\n    data_type: {spec.data_type}' in config
    assert config.count("optional: true") == len(INPUTS) - 1  # all but text_input
    assert read_engine_dir(model_dir) == tiny_engine.resolve()
    assert "serving.triton.model" in (model_dir / "1" / "model.py").read_text()


def test_options_reach_the_config(tiny_engine: Path, tmp_path: Path) -> None:
    options = RepoOptions(model_name="kiln-llm", decoupled=False, max_queue_delay_us=250, instance_count=2)
    config = (write_model_repository(tiny_engine, tmp_path, options) / "config.pbtxt").read_text()
    assert 'name: "kiln-llm"' in config and "decoupled: false" in config
    assert "max_queue_delay_microseconds: 250" in config and "count: 2" in config


def test_existing_model_needs_force(tiny_engine: Path, tmp_path: Path) -> None:
    write_model_repository(tiny_engine, tmp_path)
    with pytest.raises(RepositoryError, match="already exists; pass --force"):
        write_model_repository(tiny_engine, tmp_path)
    write_model_repository(tiny_engine, tmp_path, force=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(model_name="bad name"), "--model-name"),
        (dict(instance_count=0), "--instance-count"),
        (dict(max_queue_delay_us=-1), "--max-queue-delay-us"),
    ],
)
def test_bad_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(RepositoryError, match=message):
        RepoOptions(**options)  # type: ignore[arg-type]


def test_not_an_engine_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineLoadError, match="config.json"):
        write_model_repository(tmp_path, tmp_path / "repo")
