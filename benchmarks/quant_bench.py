"""Quantized engines side by side: accuracy-gate figures, engine and resident weight bytes, and
decode tokens/s at batch 1 and 32, for unquantized (float32, bfloat16) and each quantization.

    kiln bench quant [--checkpoint DIR] [--work DIR] [--calib-size N] [--awq-calib-size N] [--out JSON] [--plot DIR]

Without --checkpoint it converts the embedded default model (SmolLM2-135M GGUF) once. Engines
are (re)built under --work (default: bench-quant/) with `build-engine`'s defaults (int8
vocab tables for int8 / int4-awq / w8a8) and --force, so a build over its accuracy budget is
still measured (the table shows the gate's verdict). ModelOpt's AWQ search costs about two
minutes per calibration sample on a CPU core, hence its own, smaller --awq-calib-size.
Decode tokens/s = generated tokens after the first / (last token time - first token time), EOS
ignored, median of --iters runs; "vs bf16" divides by the bfloat16 row of the same run.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.errors import BenchmarkError

CONFIGS: list[tuple[str, str, str]] = [  # (label, dtype, quantization)
    ("float32", "float32", "none"),
    ("bfloat16", "bfloat16", "none"),
    # Quantized engines keep float32 for what is not quantized: on this AVX2 CPU float32 GEMMs
    # are several times faster than bfloat16 ones, and the int8 / int4 kernels take bfloat16
    # activations internally either way (engine/quant/kernels.py: cpu_kernel_dtype).
    ("fp8", "float32", "fp8"),
    ("int8", "float32", "int8_wo"),
    ("int4-awq", "float32", "int4_awq"),
    ("w8a8", "float32", "w8a8_sq"),
]


def resident_weight_bytes(llm: Any) -> int:
    model = llm.engine.runner.model
    tensors = list(model.parameters()) + [b for n, b in model.named_buffers() if not n.endswith(("cos", "sin"))]
    return sum(t.numel() * t.element_size() for t in tensors)


def decode_tokens_per_s(llm: Any, batch: int, prompt_len: int, new_tokens: int, iters: int) -> float:
    from engine import SamplingParams

    vocab = llm.config.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, vocab - 100, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    rates = []
    for _ in range(iters):
        outs = llm.generate(prompts, params)
        first = min(o.metrics.first_token_time for o in outs)
        last = max(o.metrics.last_token_time for o in outs)
        rates.append(sum(len(o.token_ids) - 1 for o in outs) / (last - first))
    return statistics.median(rates)


@dataclass(frozen=True)
class QuantBenchConfig:
    checkpoint: Path | None = None
    work: Path = Path("bench-quant")
    configs: tuple[str, ...] = tuple(c[0] for c in CONFIGS)
    batches: tuple[int, ...] = (1, 32)
    calib_size: int = 32
    awq_calib_size: int = 4
    new_tokens: int = 32
    iters: int = 3
    speed: bool = True
    quant_dtype: str = "float32"  # activation dtype of the quantized rows


def run_quant_bench(cfg: QuantBenchConfig, console: Any) -> list[dict[str, Any]]:
    """Build, gate, size and time every configuration in `cfg.configs`; one row dict each."""
    from engine import LLM
    from engine.build.builder import build_engine
    from engine.build.options import BuildOptions

    unknown = [c for c in cfg.configs if c not in {label for label, _, _ in CONFIGS}]
    if unknown:
        raise BenchmarkError(f"--configs: unknown {unknown}; choose from {[c[0] for c in CONFIGS]}")
    cfg.work.mkdir(parents=True, exist_ok=True)
    checkpoint = cfg.checkpoint
    if checkpoint is None:
        from engine.build.default_model import default_checkpoint_path
        from engine.build.gguf import convert_gguf

        checkpoint = cfg.work / "smollm2-ckpt"
        if not (checkpoint / "config.json").is_file():
            convert_gguf(default_checkpoint_path(), checkpoint, progress=True)
    rows: list[dict[str, Any]] = []
    for label, dtype, algo in (c for c in CONFIGS if c[0] in cfg.configs):
        dtype = cfg.quant_dtype if algo != "none" else dtype
        out = cfg.work / (f"engine-{label}" if dtype == "float32" or algo == "none" else f"engine-{label}-{dtype}")
        calib = cfg.awq_calib_size if algo == "int4_awq" else cfg.calib_size
        opts = BuildOptions(dtype=dtype, quantization=algo, calib_size=calib, max_seq_len=512,
                            force=algo != "none")
        console.print(f"[bold]{label}[/]: building {out}" + (f" (calibration: {calib} samples)" if algo != "none" else ""))
        t0 = time.perf_counter()
        build_engine(checkpoint, out, opts, progress=True)
        report = json.loads((out / "build_report.json").read_text())
        row: dict[str, Any] = {"config": label, "dtype": dtype, "algo": algo,
                               "build_s": round(time.perf_counter() - t0, 1),
                               "engine_bytes": sum(report["bytes_per_rank"].values()),
                               "accuracy": report.get("accuracy")}
        llm = LLM(out, max_batch_size=max(cfg.batches), max_seq_len=512)
        try:
            row["resident_weight_bytes"] = resident_weight_bytes(llm)
            if cfg.speed:
                for b in cfg.batches:
                    row[f"decode_tok_s_b{b}"] = round(decode_tokens_per_s(llm, b, 16, cfg.new_tokens, cfg.iters), 1)
        finally:
            llm.engine.close()
        console.print(row)
        rows.append(row)
    return rows


def quant_table(rows: list[dict[str, Any]], batches: tuple[int, ...], title: str) -> Any:
    """A rich table of `rows`; sizes and speeds also as ratios to the bfloat16 row when present."""
    from rich.table import Table

    base = next((r for r in rows if r["config"] == "bfloat16"), None)
    table = Table(title=title)
    for col in ("config", "engine MiB", "weights MiB", "smaller vs bf16", "ppl ratio", "top-1", "greedy", "gate",
                *(f"decode tok/s b{b}" for b in batches), *(f"vs bf16 b{b}" for b in batches)):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        acc = r["accuracy"] or {}
        speeds = [r.get(f"decode_tok_s_b{b}") for b in batches]
        ratios = [f"{s / base[f'decode_tok_s_b{b}']:.2f}x" if base and s and base.get(f"decode_tok_s_b{b}") else "-"
                  for s, b in zip(speeds, batches, strict=True)]
        table.add_row(
            r["config"], f"{r['engine_bytes'] / 2**20:.1f}", f"{r['resident_weight_bytes'] / 2**20:.1f}",
            f"{base['engine_bytes'] / r['engine_bytes']:.2f}x" if base else "-",
            f"{acc['ppl_ratio']:.4f}" if acc else "-", f"{acc['top1_agreement']:.1%}" if acc else "-",
            f"{acc['greedy_match']:.1%}" if acc else "-",
            ("pass" if acc["passed"] else f"FAIL (budget {acc['budget']})") if acc else "-",
            *(str(s) if s is not None else "-" for s in speeds), *ratios,
        )
    return table


def plot_quant(rows: list[dict[str, Any]], batches: tuple[int, ...], out_dir: str | Path) -> Path:
    """`quant.png`: engine MiB and decode tokens/s per configuration, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [r["config"] for r in rows]
    fig, axes = plt.subplots(1, 1 + len(batches), figsize=(4.5 * (1 + len(batches)), 4))
    axes[0].bar(labels, [r["engine_bytes"] / 2**20 for r in rows], color="tab:blue")
    axes[0].set_title("engine size (MiB)")
    for ax, b in zip(axes[1:], batches, strict=True):
        ax.bar(labels, [r.get(f"decode_tok_s_b{b}") or 0 for r in rows], color="tab:orange")
        ax.set_title(f"decode tokens/s, batch {b}")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    path = out / "quant.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
