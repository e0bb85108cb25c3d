"""Tensor parallelism, TP=1 versus TP=N on one machine: prefill and decode tokens/s.

    .venv/bin/python -m benchmarks.tp_bench [--checkpoint CKPT] [--tp N] [--prompts 8]
        [--prompt-len 128] [--decode-tokens 32] [--json out.json]

Builds both engines (float32) from the checkpoint (default: the bundled SmolLM2-135M GGUF)
into a temporary directory, then for each: one warm-up request; prefill = the batch of random
prompts with max_tokens=1 (prompt tokens / seconds); decode = the same batch with
1 + decode_tokens (prefix caching off), decode tokens / (its time - the prefill time).

Runs: TP=1 with all cores as intra-op threads, TP=1 with one thread, and TP=N with
cores // N threads per rank (at least 1), rank 0 included.
Build time is not measured. Results are printed as a rich table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table


def _measure(engine_dir: Path, prompts: list[list[int]], decode_tokens: int) -> dict[str, float]:
    from engine import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(engine_dir, enable_prefix_caching=False)
    load_s = time.perf_counter() - started
    try:
        llm.generate([prompts[0][:16]], SamplingParams(max_tokens=2, temperature=0))  # warm-up
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0))
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=1 + decode_tokens, temperature=0, ignore_eos=True))
        full_s = time.perf_counter() - t0
    finally:
        llm.engine.close()
    assert all(len(o.token_ids) == 1 + decode_tokens for o in outs)
    num_prompt = sum(len(p) for p in prompts)
    return {
        "load_s": load_s,
        "prefill_tok_s": num_prompt / prefill_s,
        "decode_tok_s": len(prompts) * decode_tokens / max(full_s - prefill_s, 1e-9),
        "decode_step_ms": 1000 * max(full_s - prefill_s, 1e-9) / decode_tokens,
    }


def run(checkpoint: str, tp: int, num_prompts: int, prompt_len: int, decode_tokens: int) -> dict[str, Any]:
    from engine.build.builder import BuildOptions, build_engine
    from engine.config import load_engine_config

    cores = os.cpu_count() or 1
    results: dict[str, Any] = {"checkpoint": checkpoint, "cores": cores, "num_prompts": num_prompts,
                               "prompt_len": prompt_len, "decode_tokens": decode_tokens, "runs": {}}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="kiln-tp-bench-") as tmp:
        dirs = {}
        for n in (1, tp):
            options = BuildOptions(dtype="float32", tp_size=n, max_seq_len=prompt_len + decode_tokens + 8,
                                   max_batch_size=num_prompts)
            dirs[n] = Path(build_engine(checkpoint, Path(tmp) / f"tp{n}", options, progress=True))
        vocab = load_engine_config(dirs[1]).model.vocab_size
        rng = random.Random(0)
        prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(num_prompts)]
        configs = [(1, cores), (tp, max(1, cores // tp))]
        if cores > 1:
            configs.insert(1, (1, 1))  # shows what intra-op threading alone does on this machine
        for n, per_rank in configs:
            torch.set_num_threads(per_rank)
            os.environ["OMP_NUM_THREADS"] = str(per_rank)  # inherited by the workers
            try:
                results["runs"][f"tp{n}-{per_rank}t"] = {
                    "threads_per_rank": per_rank, **_measure(dirs[n], prompts, decode_tokens)}
            finally:
                torch.set_num_threads(threads)
    return results


def table(results: dict[str, Any]) -> Table:
    t = Table(title=f"Tensor parallelism on {results['cores']} CPU cores ({Path(results['checkpoint']).name}, "
                    f"{results['num_prompts']} x {results['prompt_len']} prompt tokens, "
                    f"{results['decode_tokens']} decode tokens each, float32)")
    for col in ("engine", "threads/rank", "load s", "prefill tok/s", "decode tok/s", "decode step ms"):
        t.add_column(col, justify="right")
    for name, r in results["runs"].items():
        t.add_row(name, str(r["threads_per_rank"]), f"{r['load_s']:.1f}", f"{r['prefill_tok_s']:.0f}",
                  f"{r['decode_tok_s']:.1f}", f"{r['decode_step_ms']:.1f}")
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="HF checkpoint dir or .gguf (default: bundled SmolLM2)")
    parser.add_argument("--tp", type=int, default=3, help="ranks to compare with TP=1 (SmolLM2-135M: 9 heads, "
                                                          "3 KV heads -> 3; 2 is an impossible split)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    checkpoint = args.checkpoint
    if checkpoint is None:
        from engine.build.default_model import default_checkpoint_path

        checkpoint = str(default_checkpoint_path())
    results = run(checkpoint, args.tp, args.prompts, args.prompt_len, args.decode_tokens)
    Console().print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
