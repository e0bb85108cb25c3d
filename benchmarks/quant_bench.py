"""Quantized engines side by side: accuracy-gate figures, engine and resident weight bytes, and
decode tokens/s at batch 1 and 32, for unquantized (float32, bfloat16) and each quantization.

    python -m benchmarks.quant_bench [--checkpoint DIR] [--work DIR] [--calib-size N] [--json OUT]

Without --checkpoint it converts the embedded default model (SmolLM2-135M GGUF) once. Engines
are (re)built under --work (default: bench-quant/). Decode tokens/s = generated tokens after the
first / (last token time - first token time), EOS ignored, median of --iters runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

CONFIGS: list[tuple[str, str, str]] = [  # (label, dtype, quantization)
    ("float32", "float32", "none"),
    ("bfloat16", "bfloat16", "none"),
    ("fp8", "bfloat16", "fp8"),
    ("int8", "bfloat16", "int8_wo"),
    ("int4-awq", "bfloat16", "int4_awq"),
    ("w8a8", "bfloat16", "w8a8_sq"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--work", type=Path, default=Path("bench-quant"))
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-speed", action="store_true", help="only build, gate and size")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from engine import LLM
    from engine.build.builder import build_engine
    from engine.build.options import BuildOptions

    console = Console()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:
        from engine.build.default_model import default_checkpoint_path
        from engine.build.gguf import convert_gguf

        checkpoint = args.work / "smollm2-ckpt"
        if not (checkpoint / "config.json").is_file():
            convert_gguf(default_checkpoint_path(), checkpoint, progress=True)
    wanted = args.configs.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict[str, Any]] = []
    for label, dtype, algo in (c for c in CONFIGS if c[0] in wanted):
        out = args.work / f"engine-{label}"
        opts = BuildOptions(dtype=dtype, quantization=algo, calib_size=args.calib_size, max_seq_len=512,
                            force=algo != "none")
        t0 = time.perf_counter()
        build_engine(checkpoint, out, opts, progress=False)
        report = json.loads((out / "build_report.json").read_text())
        row: dict[str, Any] = {"config": label, "dtype": dtype, "algo": algo,
                               "build_s": round(time.perf_counter() - t0, 1),
                               "engine_bytes": sum(report["bytes_per_rank"].values()),
                               "accuracy": report.get("accuracy")}
        llm = LLM(out, max_batch_size=max(batches), max_seq_len=512)
        row["resident_weight_bytes"] = resident_weight_bytes(llm)
        if not args.no_speed:
            for b in batches:
                row[f"decode_tok_s_b{b}"] = round(decode_tokens_per_s(llm, b, 16, args.new_tokens, args.iters), 1)
        llm.engine.close()
        console.print(row)
        rows.append(row)

    table = Table(title=f"Quantized engines ({checkpoint.name}, torch threads {torch.get_num_threads()})")
    for col in ("config", "engine MiB", "weights MiB", "ppl ratio", "top-1", "greedy",
                *(f"decode tok/s b{b}" for b in batches)):
        table.add_column(col, justify="right")
    for r in rows:
        acc = r["accuracy"] or {}
        table.add_row(
            r["config"], f"{r['engine_bytes'] / 2**20:.1f}", f"{r['resident_weight_bytes'] / 2**20:.1f}",
            f"{acc['ppl_ratio']:.4f}" if acc else "-", f"{acc['top1_agreement']:.1%}" if acc else "-",
            f"{acc['greedy_match']:.1%}" if acc else "-",
            *(str(r.get(f"decode_tok_s_b{b}", "-")) for b in batches),
        )
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
