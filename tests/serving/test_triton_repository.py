"""`kiln repo`: the model repository written for an engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.config import load_engine_config
from engine.errors import EngineLoadError
from serving.triton.launcher import TritonServer
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


def test_no_decoupled_repository_serves_http_infer_and_refuses_streaming(
    tiny_engine: Path, triton_factory: Callable[..., TritonServer]
) -> None:
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from engine import LLM, SamplingParams

    server = triton_factory(tiny_engine, decoupled=False, max_queue_delay_us=1000)
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))

    def infer(**values: object) -> Any:
        inputs = []
        for name, (value, triton_type, dtype) in values.items():  # type: ignore[misc]
            tensor = httpclient.InferInput(name, [1, 1], triton_type)
            tensor.set_data_from_numpy(np.array([[value]], dtype=dtype))
            inputs.append(tensor)
        return client.infer("ensemble", inputs)

    prompt = "What is ML?"
    expected = LLM(tiny_engine).generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].text
    try:
        result = infer(text_input=(prompt.encode(), "BYTES", np.object_), max_tokens=(12, "INT32", np.int32))
        assert result.as_numpy("text_output").reshape(-1)[0].decode() == prompt + expected
        with pytest.raises(InferenceServerException, match="stream=true needs a decoupled model"):
            infer(text_input=(b"hi", "BYTES", np.object_), stream=(True, "BOOL", np.bool_))
    finally:
        client.close()
