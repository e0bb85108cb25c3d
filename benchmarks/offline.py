"""`kiln bench offline`: in-process generation throughput of Kiln against Hugging Face
`generate` (one batched call) and vLLM's offline `LLM` on the same model and prompts.

vLLM cannot be imported in Kiln's venv, so its row is measured by `benchmarks.vllm_offline`
run with vLLM's interpreter (`make vllm` -> .venv-vllm, or $KILN_VLLM_PYTHON; "" = off),
found as the vllm serving backend finds it; without it the row says "not installed: run
make vllm". vLLM loads the Hugging Face checkpoint (`--hf-checkpoint`, else the engine's
`source.checkpoint`), with `VLLM_CPU_KVCACHE_SPACE` GiB of KV cache (default 2).

Fairness rules, applied to every backend: the same `batch` prompts of exactly `input_len`
token ids (equal lengths, so Hugging Face needs no padding), greedy decoding, exactly
`output_len` new tokens (EOS ignored: `ignore_eos` for Kiln and vLLM, `min_new_tokens` for
Hugging Face), the same dtype, device and torch thread count (vLLM: its OpenMP threads, bound to cores
0..threads-1). Kiln and vLLM run with prefix caching off so that repeated iterations do not
reuse the previous one's KV cache.

Each iteration times a run with 1 new token (prefill, plus one sampling step) and a full
run; decode tok/s = batch × (output_len − 1) / (full − prefill). Steps/s = decode tok/s /
batch, and MBU = weight bytes per step × steps/s ÷ measured copy bandwidth (see
`benchmarks.bandwidth`); with `--batch 1` that is the batch-1 decode MBU.
"""

from __future__ import annotations

import gc
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks.bandwidth import Bandwidth, measure_copy_bandwidth, weight_bytes_per_decode_step
from benchmarks.bandwidth import mbu as compute_mbu
from benchmarks.datasets import load_tokenizer, random_requests
from benchmarks.environment import collect_environment
from benchmarks.errors import BenchmarkError
from benchmarks.results import SCHEMA_VERSION, write_json
from engine.config import EngineConfig, is_engine_dir, load_engine_config

OFFLINE_BACKENDS = ("kiln", "hf", "vllm")
TORCH_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class OfflineBenchConfig:
    engine: str
    hf_checkpoint: str | None = None
    batch: int = 32
    input_len: int = 128
    output_len: int = 128
    backends: tuple[str, ...] = ("kiln", "hf", "vllm")
    dtype: str | None = None
    device: str = "cpu"
    num_iters: int = 3
    warmup: int = 1
    threads: int | None = None
    seed: int = 0
    measure_bandwidth: bool = True

    def __post_init__(self) -> None:
        for name in ("batch", "input_len", "num_iters"):
            if getattr(self, name) < 1:
                raise BenchmarkError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.output_len < 2:
            raise BenchmarkError(f"--output-len must be >= 2 (decode needs tokens after the first), got {self.output_len}")
        if self.warmup < 0:
            raise BenchmarkError(f"--warmup must be >= 0, got {self.warmup}")
        unknown = [b for b in self.backends if b not in OFFLINE_BACKENDS]
        if unknown or not self.backends:
            raise BenchmarkError(f"--backend {','.join(self.backends)}: choose from {','.join(OFFLINE_BACKENDS)}")
        if self.dtype is not None and self.dtype not in TORCH_DTYPES:
            raise BenchmarkError(f"--dtype {self.dtype!r} is not one of {list(TORCH_DTYPES)}")


@dataclass
class BackendResult:
    """Timings of one backend (medians over iterations, seconds) and the rates they imply."""

    backend: str
    status: str  # "ok", "not installed", or "failed: <reason>"
    load_s: float | None = None
    prefill_s: float | None = None
    total_s: float | None = None
    output_tokens: int = 0
    output_tok_s: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    decode_steps_per_s: float | None = None
    mbu: float | None = None


@dataclass
class OfflineReport:
    config: dict[str, Any]
    environment: dict[str, Any]
    dtype: str
    weight_bytes_per_step: int | None
    bandwidth: Bandwidth | None
    results: list[BackendResult] = field(default_factory=list)

    def ratios(self) -> dict[str, float]:
        """kiln / other for output and decode tok/s, for every other backend that ran."""
        ok = {r.backend: r for r in self.results if r.status == "ok"}
        kiln = ok.get("kiln")
        out: dict[str, float] = {}
        if kiln is None:
            return out
        for name, other in ok.items():
            if name == "kiln":
                continue
            for key in ("output_tok_s", "decode_tok_s"):
                a, b = getattr(kiln, key), getattr(other, key)
                if a and b:
                    out[f"kiln/{name} {key}"] = a / b
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "kiln_bench": SCHEMA_VERSION,
            "kind": "offline",
            "config": {**self.config, "dtype": self.dtype},
            "environment": self.environment,
            "bandwidth": self.bandwidth.to_dict() if self.bandwidth else None,
            "weight_bytes_per_step": self.weight_bytes_per_step,
            "results": [asdict(r) for r in self.results],
            "ratios": self.ratios(),
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())


class Runner(ABC):
    """One way of generating: load once, then `generate` batches of token-id prompts."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[int]:
        """Greedy, EOS ignored; returns the number of new tokens of each prompt."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model."""


class KilnRunner(Runner):
    def __init__(self, engine: str, dtype: str, device: str) -> None:
        from engine import LLM

        self.llm = LLM(engine, device=device, dtype=dtype, enable_prefix_caching=False)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[int]:
        from engine import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [len(o.token_ids) for o in self.llm.generate(prompts, params)]

    def close(self) -> None:
        del self.llm


class HFRunner(Runner):
    def __init__(self, checkpoint: str, dtype: str, device: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        path = Path(checkpoint)
        kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
        if path.suffix == ".gguf":  # transformers dequantizes GGUF itself, as build-engine does
            kwargs["gguf_file"] = path.name
            path = path.parent
        model: Any = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        self.model = model.to(device).eval()
        self.device = device

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[int]:
        import torch

        ids = torch.tensor(prompts, device=self.device)  # (B, L): equal lengths, no padding
        config = self.model.generation_config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                min_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=pad,
            )
        return [out.shape[1] - ids.shape[1]] * ids.shape[0]

    def close(self) -> None:
        del self.model


def resolve_checkpoint(config: OfflineBenchConfig, engine: EngineConfig | None) -> str:
    """The Hugging Face checkpoint of the same weights: --hf-checkpoint, else the engine's
    `source.checkpoint`, else ENGINE itself when it is a checkpoint directory."""
    if config.hf_checkpoint:
        path = Path(config.hf_checkpoint)
    elif engine is not None:
        source = engine.source.get("checkpoint")
        if not source:
            raise BenchmarkError(f"{config.engine}: config.json has no source.checkpoint; pass --hf-checkpoint DIR")
        path = Path(source)
        if not path.is_absolute() and (Path(config.engine) / path).exists():
            path = Path(config.engine) / path
    else:
        path = Path(config.engine)
    if not path.exists():
        raise BenchmarkError(f"Hugging Face checkpoint {path} does not exist; pass --hf-checkpoint DIR")
    return str(path)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _time(run: Callable[[], list[int]]) -> tuple[float, list[int]]:
    start = time.perf_counter()
    counts = run()
    return time.perf_counter() - start, counts


def run_offline_benchmark(config: OfflineBenchConfig, console: Console | None = None) -> OfflineReport:
    """Measure every requested backend in turn (one model loaded at a time)."""
    import torch

    console = console or Console(stderr=True)
    if not Path(config.engine).exists():
        raise BenchmarkError(f"ENGINE {config.engine}: no such directory")
    if config.threads:
        torch.set_num_threads(config.threads)
    engine_cfg = load_engine_config(config.engine) if is_engine_dir(config.engine) else None
    dtype = config.dtype or (engine_cfg.build.dtype if engine_cfg else "float32")
    tokenizer = load_tokenizer(config.engine)
    requests = random_requests(tokenizer, config.batch, config.input_len, 1, seed=config.seed)
    prompts = [list(tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) for r in requests]

    bandwidth = None
    if config.measure_bandwidth:
        console.print("measuring memory bandwidth (large tensor copy)...")
        bandwidth = measure_copy_bandwidth(config.device)
    weight_bytes = None
    if engine_cfg is not None and engine_cfg.build.quantization.algo == "none":
        weight_bytes = weight_bytes_per_decode_step(engine_cfg.model, dtype)
    report = OfflineReport(config=asdict(config), environment={}, dtype=dtype,
                           weight_bytes_per_step=weight_bytes, bandwidth=bandwidth)

    runners: dict[str, Callable[[], Runner]] = {
        "kiln": lambda: KilnRunner(config.engine, dtype, config.device),
        "hf": lambda: HFRunner(resolve_checkpoint(config, engine_cfg), dtype, config.device),
    }
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for name in config.backends:
            task = progress.add_task(f"{name}: load", total=config.warmup + 2 * config.num_iters)
            if name == "vllm":
                result = _measure_vllm(resolve_checkpoint(config, engine_cfg), dtype, prompts, config, report,
                                       progress, task)
            else:
                result = _measure(name, runners[name], prompts, config, report, progress, task)
            report.results.append(result)
            gc.collect()
    report.environment = collect_environment(config.engine)
    return report


def _measure(name: str, make: Callable[[], Runner], prompts: list[list[int]], config: OfflineBenchConfig,
             report: OfflineReport, progress: Progress, task: Any) -> BackendResult:
    start = time.perf_counter()
    runner = make()
    load_s = time.perf_counter() - start
    prefills, totals, counts = [], [], []
    try:
        for _ in range(config.warmup):
            progress.update(task, description=f"{name}: warm-up")
            runner.generate(prompts, min(4, config.output_len))
            progress.advance(task)
        for _ in range(config.num_iters):
            progress.update(task, description=f"{name}: prefill")
            t, _ = _time(lambda: runner.generate(prompts, 1))
            prefills.append(t)
            progress.advance(task)
            progress.update(task, description=f"{name}: generate")
            t, generated = _time(lambda: runner.generate(prompts, config.output_len))
            totals.append(t)
            counts.append(generated)
            progress.advance(task)
    finally:
        runner.close()
    return _result(name, load_s, prefills, totals, counts, config, report)


def _measure_vllm(checkpoint: str, dtype: str, prompts: list[list[int]], config: OfflineBenchConfig,
                  report: OfflineReport, progress: Progress, task: Any) -> BackendResult:
    """The same loop as `_measure`, run by `benchmarks.vllm_offline` in vLLM's own venv."""
    import torch

    from benchmarks.vllm_offline import measure_in_vllm_env

    progress.update(task, description="vllm: load (its engine start takes minutes on CPU)")

    started = [0]  # runs begun so far; each KILN_PROGRESS line starts one

    def advance(what: str) -> None:
        progress.update(task, description=f"vllm: {what}", completed=started[0])
        started[0] += 1

    job = {"checkpoint": str(Path(checkpoint).resolve()), "dtype": dtype, "prompts": prompts,
           "output_len": config.output_len, "warmup": config.warmup, "num_iters": config.num_iters,
           "threads": config.threads or torch.get_num_threads(), "seed": config.seed,
           "max_model_len": config.input_len + config.output_len}
    status, timings = measure_in_vllm_env(job, advance)
    progress.update(task, completed=progress.tasks[task].total)
    if timings is None:
        progress.update(task, description=f"vllm: {status}")
        return BackendResult("vllm", status)
    return _result("vllm", timings["load_s"], timings["prefill_s"], timings["total_s"], timings["counts"],
                   config, report)


def _result(name: str, load_s: float, prefills: list[float], totals: list[float], counts: list[list[int]],
            config: OfflineBenchConfig, report: OfflineReport) -> BackendResult:
    """Medians and rates of one backend's runs; a run with the wrong token counts fails the row."""
    for generated in counts:
        if generated != [config.output_len] * config.batch:
            return BackendResult(name, f"failed: generated {generated[:4]}... tokens, expected "
                                       f"{config.output_len} per prompt", load_s=load_s)
    prefill_s, total_s = _median(prefills), _median(totals)
    batch, out_tokens = config.batch, config.batch * config.output_len
    decode_s = total_s - prefill_s
    decode_tok_s = batch * (config.output_len - 1) / decode_s if decode_s > 0 else None
    steps = decode_tok_s / batch if decode_tok_s else None
    mbu = None
    if steps and report.weight_bytes_per_step and report.bandwidth:
        mbu = compute_mbu(report.weight_bytes_per_step, steps, report.bandwidth)
    return BackendResult(
        backend=name, status="ok", load_s=load_s, prefill_s=prefill_s, total_s=total_s, output_tokens=out_tokens,
        output_tok_s=out_tokens / total_s, prefill_tok_s=batch * config.input_len / prefill_s,
        decode_tok_s=decode_tok_s, decode_steps_per_s=steps, mbu=mbu,
    )


def offline_table(report: OfflineReport) -> Table:
    cfg = report.config
    title = (f"offline: batch {cfg['batch']}, {cfg['input_len']} in / {cfg['output_len']} out, {report.dtype}, "
             f"{cfg['device']}, {report.environment.get('torch_threads')} threads")
    table = Table(title=title, title_justify="left")
    for col in ("backend", "status", "output tok/s", "decode tok/s", "prefill tok/s", "total s", "steps/s", "MBU"):
        table.add_column(col, justify="right" if col not in ("backend", "status") else "left")

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in report.results:
        table.add_row(r.backend, r.status, fmt(r.output_tok_s, ".1f"), fmt(r.decode_tok_s, ".1f"),
                      fmt(r.prefill_tok_s, ".1f"), fmt(r.total_s, ".2f"), fmt(r.decode_steps_per_s, ".2f"),
                      "-" if r.mbu is None else f"{100 * r.mbu:.1f}%")
    return table


def summary_lines(report: OfflineReport) -> list[str]:
    """Plain lines under the table: ratios, backends that did not run, and the roofline."""
    lines = []
    ratios = report.ratios()
    for other in sorted({key.split()[0].split("/")[1] for key in ratios}):
        out = ratios.get(f"kiln/{other} output_tok_s")
        dec = ratios.get(f"kiln/{other} decode_tok_s")
        parts = [f"{out:.2f}x output tok/s" if out else None, f"{dec:.2f}x decode tok/s" if dec else None]
        lines.append(f"kiln / {other}: " + ", ".join(p for p in parts if p))
    lines += [f"{r.backend}: {r.status}" for r in report.results if r.status != "ok"]
    if report.bandwidth:
        bw = report.bandwidth
        line = f"memory bandwidth: {bw.gb_per_s:.1f} GB/s ({bw.device} copy, read+write counted)"
        if report.weight_bytes_per_step:
            roofline = bw.gb_per_s * 1e9 / report.weight_bytes_per_step
            line += (f"; weights read per decode step {report.weight_bytes_per_step / 1e6:.1f} MB; "
                     f"roofline {roofline:.1f} steps/s")
        lines.append(line)
    return lines
