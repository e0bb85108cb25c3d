"""A request's `task_name` selects a prompt-tuned task of the engine over Triton."""

from __future__ import annotations

import httpx
import pytest
from tiny_models import make_prompt_adapter

from engine import LLM, SamplingParams
from engine.build.builder import BuildOptions, build_engine

PROMPT = "hello world"


@pytest.fixture(scope="module")
def task_engine(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    ckpt = tiny_checkpoint("llama-gqa")
    make_prompt_adapter(ckpt, tmp / "adapter", num_virtual_tokens=5, seed=3)
    return build_engine(ckpt, tmp / "engine", BuildOptions(dtype="float32", prompt_tables=(("qa", str(tmp / "adapter")),)),
                        progress=False)


def test_task_name_selects_the_prompt_table(task_engine, triton_factory):
    server = triton_factory(task_engine)
    params = SamplingParams(max_tokens=10, min_tokens=10, temperature=0)
    expected = LLM(task_engine).generate([PROMPT, PROMPT], params, tasks=["qa", None])
    url = f"{server.http_url}/v2/models/ensemble/generate"
    body = {"text_input": PROMPT, "max_tokens": 10, "min_tokens": 10, "exclude_input_in_output": True}
    with_task = httpx.post(url, json={**body, "task_name": "qa"}, timeout=60)
    plain = httpx.post(url, json=body, timeout=60)
    assert with_task.status_code == plain.status_code == 200
    assert with_task.json()["text_output"] == expected[0].text
    assert plain.json()["text_output"] == expected[1].text != expected[0].text

    unknown = httpx.post(url, json={**body, "task_name": "nope"}, timeout=60)
    assert unknown.status_code == 400 and "unknown task 'nope'" in unknown.json()["error"]


def test_openai_model_base_colon_task_selects_the_task(task_engine, triton_factory):
    import openai

    from serving.openai.runner import GatewayServer

    server = triton_factory(task_engine)
    params = SamplingParams(max_tokens=10, temperature=0)
    expected = LLM(task_engine).generate([PROMPT, PROMPT], params, tasks=["qa", None])
    with GatewayServer(server.grpc_url, "ensemble", task_engine, port=0) as gateway:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["ensemble", "ensemble:qa"]
        with_task = client.completions.create(model="ensemble:qa", prompt=PROMPT, max_tokens=10, temperature=0)
        plain = client.completions.create(model="ensemble", prompt=PROMPT, max_tokens=10, temperature=0)
        assert with_task.model == "ensemble:qa"
        assert with_task.choices[0].text == expected[0].text
        assert plain.choices[0].text == expected[1].text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="ensemble:nope", prompt=PROMPT, max_tokens=4)
