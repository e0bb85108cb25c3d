"""serving/backends: `--backend auto|kiln|vllm|hf` selection, and the transformers (`hf`)
backend serving a tiny random Phi-3 (an architecture Kiln does not run natively) through the
real `kiln serve --backend auto`: Triton gRPC streaming, HTTP generate and the OpenAI gateway
answer with the greedy text of transformers' own `generate`; a cancelled stream frees its
request. The backend itself is also checked directly (deltas, stop strings, seeds, abort)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from engine.errors import EngineLoadError, InvalidRequestError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from serving.backends import BackendError, choose_backend, open_backend
from serving.backends.hf import HFBackend
from serving.triton.launcher import pick_free_port
from serving.triton.repository import RepoOptions, read_backend, write_model_repository

ROOT = Path(__file__).parents[2]
PROMPTS = ["the quick brown fox", "hello world question", "machine learning models"]
MAX_TOKENS = 12
READY_TIMEOUT_S = 240


def make_phi3_checkpoint(out: Path) -> Path:
    """A tiny random Phi-3 with the test tokenizer (weights scaled up so greedy text varies)."""
    import torch
    import transformers

    from tests.tiny_models import make_tokenizer

    tok = make_tokenizer(out)
    config = transformers.Phi3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phi3_checkpoint(tmp_path_factory.mktemp("phi3"))


@pytest.fixture(scope="module")
def reference(phi3: Path) -> dict[str, str]:
    """prompt -> greedy continuation from transformers' own generate()."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(phi3)
    model = AutoModelForCausalLM.from_pretrained(phi3, dtype=torch.float32)
    texts = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        texts[prompt] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(set(texts.values())) == len(PROMPTS)  # a meaningful comparison: the outputs differ
    return texts


# ---- selection --------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the transformers fallback: vLLM off even where `make vllm` ran."""
    monkeypatch.setenv("KILN_VLLM_PYTHON", "")


def test_auto_picks_kiln_for_engines_and_native_architectures_else_hf(
    tiny_engine: Path, tiny_checkpoint: Callable[..., Path], phi3: Path
) -> None:
    engine = choose_backend(tiny_engine)
    assert (engine.name, engine.reason) == ("kiln", f"{tiny_engine} is a Kiln engine")
    for kind, arch in (("llama-gqa", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")):
        choice = choose_backend(tiny_checkpoint(kind))
        assert (choice.name, choice.reason) == ("kiln", f"Kiln runs {arch} natively")
    fallback = choose_backend(phi3, "auto")
    assert fallback.name == "hf"
    assert "Kiln does not run Phi3ForCausalLM natively" in fallback.reason and "vllm" in fallback.reason
    assert choose_backend(phi3, "hf").name == "hf"
    assert choose_backend(tiny_checkpoint("llama-gqa"), "hf").name == "hf"  # explicit hf on a Llama works too


def test_wrong_explicit_backend_is_a_clear_error(tiny_engine: Path, phi3: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="Kiln does not run Phi3ForCausalLM natively"):
        choose_backend(phi3, "kiln")
    with pytest.raises(BackendError, match=r"--backend vllm: vLLM is not installed \(make vllm\)"):
        choose_backend(phi3, "vllm")
    with pytest.raises(BackendError, match="is a Kiln engine, which only the kiln backend runs"):
        choose_backend(tiny_engine, "hf")
    with pytest.raises(BackendError, match="choose one of auto, kiln, vllm, hf"):
        choose_backend(phi3, "tensorrt")
    with pytest.raises(EngineLoadError, match="no config.json"):
        choose_backend(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModelForCausalLM"]}')
    with pytest.raises(BackendError, match="transformers does not know the architecture NoSuchModelForCausalLM"):
        choose_backend(tmp_path)


def test_repository_records_the_backend_and_reason(phi3: Path, tiny_engine: Path, tmp_path: Path) -> None:
    model_dir = write_model_repository(phi3, tmp_path / "repo", RepoOptions())
    config = (model_dir / "config.pbtxt").read_text()
    assert read_backend(model_dir) == "hf"
    assert re.search(r'key: "backend_reason"\s*value: \{ string_value: "Kiln does not run Phi3ForCausalLM', config)
    assert read_backend(write_model_repository(tiny_engine, tmp_path / "repo2", RepoOptions())) == "kiln"


def test_cli_prints_the_choice_and_refuses_a_wrong_one(
    phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.errors import run_cli
    from cli.main import app

    with pytest.raises(SystemExit) as ok:
        run_cli(app, ["repo", str(phi3), "-o", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert ok.value.code == 0, out
    assert "backend: hf (Kiln does not run Phi3ForCausalLM natively" in out.replace("\n", " ")
    assert read_backend(tmp_path / "r" / "ensemble") == "hf"
    with pytest.raises(SystemExit) as bad:
        run_cli(app, ["repo", str(phi3), "-o", str(tmp_path / "b"), "--backend", "kiln"])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "error: --backend kiln: Kiln does not run Phi3ForCausalLM natively" in err
    assert not (tmp_path / "b").exists()


# ---- the hf backend in process ----------------------------------------------------------------

class Collector:
    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []
        self.done = threading.Event()

    def __call__(self, out: RequestOutput) -> None:
        self.outputs.append(out)
        if out.finished:
            self.done.set()

    def final(self) -> RequestOutput:
        assert self.done.wait(60)
        return self.outputs[-1]


@pytest.fixture(scope="module")
def hf_backend(phi3: Path) -> Iterator[HFBackend]:
    backend = open_backend("hf", phi3)
    assert isinstance(backend, HFBackend)
    yield backend
    backend.shutdown()


def test_hf_backend_streams_generates_greedy_text_concurrently(hf_backend: HFBackend,
                                                                 reference: dict[str, str]) -> None:
    collectors = {prompt: Collector() for prompt in PROMPTS}
    for i, (prompt, collector) in enumerate(collectors.items()):
        hf_backend.add_request(f"g{i}", prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), collector)
    for prompt, collector in collectors.items():
        final = collector.final()
        assert final.text == reference[prompt] and final.finish_reason == "length"
        assert "".join(o.delta_text for o in collector.outputs) == final.text
        assert sum(len(o.delta_token_ids) for o in collector.outputs) == len(final.token_ids) == MAX_TOKENS
        assert len(collector.outputs) > 1 and [o.finished for o in collector.outputs].count(True) == 1
        m = final.metrics
        assert m is not None and m.arrival_time <= m.first_scheduled_time <= m.first_token_time  # type: ignore[operator]
    assert hf_backend.stats().max_batch_size_seen >= 2  # the three requests were in flight together


def test_hf_backend_stop_strings_seeds_and_bad_input(hf_backend: HFBackend, reference: dict[str, str]) -> None:
    prompt = PROMPTS[0]
    full = reference[prompt]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    collector = Collector()
    hf_backend.add_request("s", prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop=[stop]), collector)
    final = collector.final()
    assert (final.text, final.finish_reason, final.stop_reason) == (full[: full.index(stop)], "stop", stop)
    assert "".join(o.delta_text for o in collector.outputs) == final.text
    texts = []
    for seed in (7, 7, 8):
        collector = Collector()
        hf_backend.add_request(f"seed{len(texts)}", prompt,
                               SamplingParams(max_tokens=MAX_TOKENS, temperature=1.5, seed=seed), collector)
        texts.append(collector.final().token_ids)
    assert texts[0] == texts[1] != texts[2]
    with pytest.raises(InvalidRequestError, match="empty"):
        hf_backend.add_request("e", "", SamplingParams(), Collector())
    with pytest.raises(InvalidRequestError, match="at most 255"):
        hf_backend.add_request("long", list(range(10)) * 30, SamplingParams(), Collector())


def test_hf_backend_abort_frees_the_request(hf_backend: HFBackend) -> None:
    collector = Collector()
    hf_backend.add_request("a", "hello", SamplingParams(max_tokens=200, ignore_eos=True), collector)
    deadline = time.monotonic() + 30
    while len(collector.outputs) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    hf_backend.abort("a")
    final = collector.final()
    assert final.finish_reason == "abort" and len(final.token_ids) < 200
    assert hf_backend.stats().num_running == 0
    again = Collector()  # the id is free again
    hf_backend.add_request("a", "hello", SamplingParams(max_tokens=2), again)
    assert again.final().finish_reason == "length"


def _generate_ids(phi3: Path, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """transformers' own greedy generate, exactly `num_tokens` new tokens (EOS suppressed before)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(phi3, dtype=torch.float32)
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _exactly(num_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=num_tokens, min_tokens=num_tokens, temperature=0)


def test_hf_backend_batches_requests_of_different_lengths_exactly_like_generate(phi3: Path) -> None:
    """Two batch slots: a long request A and a victim run together, B (a longer prompt than the
    batch is wide) and C (short) wait; aborting the victim gives B its slot while A still runs,
    C joins when A leaves. Every finished request equals `generate` token for token."""
    backend = HFBackend(phi3, max_batch_size=2)
    try:
        tok = backend.tokenizer
        words = "the quick brown fox jumps over a lazy dog while machine learning models generate text".split()
        prompts = {"A": tok(" ".join(words[:9])).input_ids, "B": tok(" ".join(words * 3)).input_ids,
                   "C": tok("hello").input_ids}
        lengths = {"A": 120, "B": 40, "C": 25}
        assert len(prompts["B"]) > len(prompts["A"]) + 20 and len(prompts["C"]) < 3
        collectors = {name: Collector() for name in (*prompts, "victim")}
        backend.add_request("victim", prompts["C"], SamplingParams(max_tokens=240, ignore_eos=True),
                            collectors["victim"])
        backend.add_request("A", prompts["A"], _exactly(lengths["A"]),
                            collectors["A"])
        assert _wait_for(lambda: len(collectors["victim"].outputs) >= 3 and len(collectors["A"].outputs) >= 1)
        for name in ("B", "C"):
            backend.add_request(name, prompts[name], _exactly(lengths[name]), collectors[name])
        assert _wait_for(lambda: backend.stats().num_waiting == 2)
        assert (backend.stats().num_running, len(collectors["B"].outputs)) == (2, 0)  # the batch is full
        backend.abort("victim")
        finals = {name: collectors[name].final() for name in (*prompts, "victim")}
        assert finals["victim"].finish_reason == "abort" and len(finals["victim"].token_ids) < 240
        b_metrics, a_metrics = finals["B"].metrics, finals["A"].metrics
        assert b_metrics is not None and a_metrics is not None
        assert b_metrics.first_token_time < a_metrics.finished_time  # type: ignore[operator]  # B took the slot
        for name, prompt_ids in prompts.items():
            assert finals[name].finish_reason == "length"
            assert finals[name].token_ids == _generate_ids(phi3, prompt_ids, lengths[name]), name
        stats = backend.stats()
        assert (stats.num_running, stats.num_waiting, stats.max_batch_size_seen) == (0, 0, 2)
    finally:
        backend.shutdown()


# ---- served by `kiln serve --backend auto` ------------------------------------------------------

@pytest.fixture(scope="module")
def served(phi3: Path) -> Iterator[SimpleNamespace]:
    ports = {name: pick_free_port() for name in ("http", "grpc", "metrics", "openai")}
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", str(phi3), "--backend", "auto",
         *(arg for name, port in ports.items() for arg in (f"--{name}-port", str(port)))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200", "KILN_VLLM_PYTHON": ""},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip() for line in process.stdout or ()),
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not any("Ctrl-C to stop" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "\n".join(lines)
            time.sleep(0.2)
        yield SimpleNamespace(lines=lines, http=f"http://127.0.0.1:{ports['http']}",
                              grpc=f"127.0.0.1:{ports['grpc']}", metrics=f"http://127.0.0.1:{ports['metrics']}/metrics",
                              openai=f"http://127.0.0.1:{ports['openai']}/v1")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        reader.join(timeout=5)
    assert code == 0, "\n".join(lines)


def test_serve_auto_prints_hf_and_grpc_streams_transformers_greedy_text(
    served: SimpleNamespace, reference: dict[str, str], triton_client: SimpleNamespace
) -> None:
    assert any(re.search(r"backend: hf \(Kiln does not run Phi3ForCausalLM natively", line) for line in served.lines)
    for prompt in PROMPTS:
        gen = asyncio.run(triton_client.stream_generate(served.grpc, triton_client.inputs(prompt, MAX_TOKENS)))
        assert gen.error is None and gen.text == reference[prompt] and len(gen.chunks) > 1
        assert (gen.finish_reason, gen.num_output_tokens) == ("length", MAX_TOKENS)


def test_http_generate_and_openai_gateway_answer_with_the_same_text(
    served: SimpleNamespace, reference: dict[str, str]
) -> None:
    import openai

    client = openai.OpenAI(base_url=served.openai, api_key="unused", max_retries=0)
    for prompt in PROMPTS[:2]:
        response = httpx.post(f"{served.http}/v2/models/ensemble/generate", timeout=60,
                              json={"text_input": prompt, "max_tokens": MAX_TOKENS})
        assert response.status_code == 200, response.text
        assert response.json()["text_output"] == prompt + reference[prompt]
        completion = client.completions.create(model="ensemble", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert completion.choices[0].text == reference[prompt]
        assert completion.usage is not None and completion.usage.completion_tokens == MAX_TOKENS
    chunks = client.completions.create(model="ensemble", prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference[PROMPTS[2]]


def test_cancelled_stream_frees_the_request(served: SimpleNamespace, triton_client: SimpleNamespace) -> None:
    scrape = triton_client.scrape

    def value(name: str, **labels: str) -> float:
        return float(scrape(served.metrics, name, **labels))

    aborted = value("kiln_requests_finished_total", finish_reason="abort")
    inputs = triton_client.inputs("hello", 240, ignore_eos=True)
    gen = asyncio.run(triton_client.stream_generate(served.grpc, inputs, cancel_after_chunks=3))
    assert gen.finish_reason is None and len(gen.chunks) == 3
    assert _wait_for(lambda: value("kiln_requests_finished_total", finish_reason="abort") == aborted + 1)
    assert _wait_for(lambda: value("kiln_num_requests_running") == 0)
    tokens = value("kiln_generation_tokens_total")
    time.sleep(0.5)
    assert value("kiln_generation_tokens_total") == tokens  # nothing is generating any more


def _wait_for(condition: Callable[[], Any], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())
