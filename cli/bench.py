"""`kiln bench serve|offline|compare`: thin wrappers over `benchmarks/` (imported lazily)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console


def _stdout_console() -> Console:
    """Tables at full width even when stdout is a file or pipe (rich would cut them at 80 columns)."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def register(app: typer.Typer) -> None:
    bench = typer.Typer(help="Benchmark a server (serve), the engine in-process (offline), or compare results.",
                        no_args_is_help=True)
    app.add_typer(bench, name="bench")

    @bench.command("serve")
    def serve(
        tokenizer: Path = typer.Option(..., help="Engine or checkpoint directory: its tokenizer makes and counts tokens."),
        backend: str = typer.Option("triton-grpc", help="triton-grpc | triton-http | openai | openai-chat."),
        url: str = typer.Option(None, help="Server address (default: 127.0.0.1:8001 for gRPC, "
                                "http://127.0.0.1:8000 for HTTP, http://127.0.0.1:9000/v1 for OpenAI)."),
        model: str = typer.Option("ensemble", help="Model name on the server."),
        dataset: str = typer.Option("random", help="random | sharegpt | prefix."),
        dataset_path: Path = typer.Option(None, help="ShareGPT JSON file (default: the bundled sample)."),
        input_len: int = typer.Option(128, help="Prompt tokens (random) or suffix tokens (prefix)."),
        output_len: int = typer.Option(128, help="Output tokens (random, prefix; sharegpt with --ignore-eos)."),
        range_ratio: float = typer.Option(0.0, help="random: lengths uniform in len*(1-r)..len*(1+r)."),
        num_prefixes: int = typer.Option(4, help="prefix: number of shared system prompts."),
        prefix_len: int = typer.Option(256, help="prefix: tokens per shared system prompt."),
        num_prompts: int = typer.Option(100, help="Requests per sweep point."),
        num_warmups: int = typer.Option(0, help="Unmeasured warm-up requests before the first point."),
        request_rate: str = typer.Option("inf", help="Requests/s (Poisson), comma-separated to sweep: 1,2,4,inf."),
        burstiness: float = typer.Option(1.0, help="Gamma shape of arrivals: 1 Poisson, <1 burstier."),
        max_concurrency: str = typer.Option(None, help="Cap on requests in flight, comma-separated to sweep: 1,4,16,64."),
        ignore_eos: bool = typer.Option(False, help="Generate exactly the requested output lengths."),
        temperature: float = typer.Option(0.0, help="Sampling temperature (0 = greedy)."),
        slo: str = typer.Option(None, help="Goodput SLOs in ms, e.g. ttft:200,tpot:50."),
        seed: int = typer.Option(0, help="Seed of prompts and arrivals."),
        metrics_url: str = typer.Option(None, help="Server Prometheus endpoint (http://127.0.0.1:8002/metrics) "
                                        "to record its kiln_* figures per run."),
        api_key: str = typer.Option(None, help="Bearer token for OpenAI backends (default: $KILN_API_KEY or $OPENAI_API_KEY)."),
        out: Path = typer.Option(None, help="Write results JSON (config, environment, per-request records)."),
        csv: Path = typer.Option(None, "--csv", help="Write one CSV row per sweep point."),
        plot: Path = typer.Option(None, help="Write PNG plots into this directory."),
    ) -> None:
        """Load-test a running server with vLLM-compatible metrics (TTFT, TPOT, ITL, E2EL, goodput)."""
        import asyncio

        from benchmarks.metrics import parse_slo
        from benchmarks.report import print_serve_report, write_csv
        from benchmarks.serve import ServeBenchConfig, default_url, parse_sweep, run_serve_benchmark

        console = _stdout_console()
        concurrencies = [int(c) for c in parse_sweep(max_concurrency, "--max-concurrency", False)] \
            if max_concurrency else [None]
        config = ServeBenchConfig(
            backend=backend, url=url or default_url(backend), model=model, tokenizer=str(tokenizer),
            dataset=dataset, dataset_path=str(dataset_path) if dataset_path else None, input_len=input_len,
            output_len=output_len, range_ratio=range_ratio, num_prefixes=num_prefixes, prefix_len=prefix_len,
            num_prompts=num_prompts, num_warmups=num_warmups,
            request_rates=tuple(parse_sweep(request_rate, "--request-rate", True)),
            max_concurrencies=tuple(concurrencies), burstiness=burstiness, ignore_eos=ignore_eos,
            temperature=temperature, slo=parse_slo(slo), seed=seed, metrics_url=metrics_url,
        )
        key = api_key or os.environ.get("KILN_API_KEY") or os.environ.get("OPENAI_API_KEY")
        report = asyncio.run(run_serve_benchmark(config, api_key=key, console=Console(stderr=True)))
        print_serve_report(report, console)
        if out:
            report.save(out)
            console.print(f"results: {out}")
        if csv:
            write_csv(report, csv)
            console.print(f"csv: {csv}")
        if plot:
            from benchmarks.plots import plot_report

            for path in plot_report(report, plot):
                console.print(f"plot: {path}")
        if report.interrupted:
            raise typer.Exit(130)

    @bench.command("offline")
    def offline(
        engine: Path = typer.Argument(..., help="Kiln engine directory (or a Hugging Face checkpoint directory)."),
        batch: int = typer.Option(32, help="Prompts per batch."),
        input_len: int = typer.Option(128, help="Prompt tokens (exact)."),
        output_len: int = typer.Option(128, help="New tokens per prompt (exact, EOS ignored)."),
        backend: str = typer.Option("kiln,hf,vllm", help="Comma-separated: kiln, hf, vllm (vllm runs in .venv-vllm: make vllm)."),
        hf_checkpoint: Path = typer.Option(None, help="Hugging Face checkpoint of the same weights "
                                           "(default: the engine's source.checkpoint)."),
        dtype: str = typer.Option(None, help="float32 | bfloat16 | float16 (default: the engine's build dtype)."),
        device: str = typer.Option("cpu", help="cpu or cuda."),
        num_iters: int = typer.Option(3, help="Timed iterations (medians are reported)."),
        warmup: int = typer.Option(1, help="Untimed warm-up runs per backend."),
        threads: int = typer.Option(None, help="torch threads for every backend (default: torch's)."),
        seed: int = typer.Option(0, help="Seed of the prompts."),
        bandwidth: bool = typer.Option(True, help="Measure memory bandwidth and report MBU."),
        out: Path = typer.Option(None, help="Write results JSON."),
    ) -> None:
        """In-process tokens/s of Kiln vs Hugging Face generate (and vLLM), with the MBU roofline."""
        from benchmarks.offline import OfflineBenchConfig, offline_table, run_offline_benchmark, summary_lines

        config = OfflineBenchConfig(
            engine=str(engine), hf_checkpoint=str(hf_checkpoint) if hf_checkpoint else None, batch=batch,
            input_len=input_len, output_len=output_len,
            backends=tuple(b.strip() for b in backend.split(",") if b.strip()), dtype=dtype, device=device,
            num_iters=num_iters, warmup=warmup, threads=threads, seed=seed, measure_bandwidth=bandwidth,
        )
        report = run_offline_benchmark(config, console=Console(stderr=True))
        console = _stdout_console()
        console.print(offline_table(report))
        for line in summary_lines(report):
            console.print(line, highlight=False)
        if out:
            report.save(out)
            console.print(f"results: {out}")

    @bench.command("quant")
    def quant(
        checkpoint: Path = typer.Option(None, help="Hugging Face checkpoint (default: the embedded SmolLM2-135M)."),
        work: Path = typer.Option(Path("bench-quant"), help="Where the engines are built."),
        configs: str = typer.Option("float32,bfloat16,fp8,int8,int4-awq,w8a8", help="Comma-separated rows."),
        batches: str = typer.Option("1,32", help="Comma-separated decode batch sizes."),
        calib_size: int = typer.Option(32, help="Calibration samples (fp8, int8, w8a8)."),
        awq_calib_size: int = typer.Option(4, help="Calibration samples for int4-awq (its search is slow on CPU)."),
        new_tokens: int = typer.Option(32, help="Tokens generated per prompt."),
        iters: int = typer.Option(3, help="Timed runs per batch size (median reported)."),
        speed: bool = typer.Option(True, help="Measure decode tokens/s (--no-speed: only build, gate, size)."),
        quant_dtype: str = typer.Option("float32", help="Engine dtype of the quantized rows (float32 | bfloat16)."),
        out: Path = typer.Option(None, help="Write the rows as JSON."),
        plot: Path = typer.Option(None, help="Write quant.png (sizes and decode tokens/s) into this directory."),
    ) -> None:
        """Quantized engines side by side: accuracy gate, engine and resident bytes, decode tokens/s."""
        import json

        import torch

        from benchmarks.errors import BenchmarkError
        from benchmarks.quant_bench import QuantBenchConfig, plot_quant, quant_table, run_quant_bench

        try:
            sizes = tuple(int(b) for b in batches.split(","))
        except ValueError:
            raise BenchmarkError(f"--batches {batches!r}: expected comma-separated integers") from None
        cfg = QuantBenchConfig(checkpoint=checkpoint, work=work, configs=tuple(configs.split(",")), batches=sizes,
                               calib_size=calib_size, awq_calib_size=awq_calib_size, new_tokens=new_tokens,
                               iters=iters, speed=speed, quant_dtype=quant_dtype)
        rows = run_quant_bench(cfg, Console(stderr=True))
        console = _stdout_console()
        console.print(quant_table(rows, sizes, f"Quantized engines (torch threads {torch.get_num_threads()})"))
        if out:
            out.write_text(json.dumps(rows, indent=2) + "\n")
            console.print(f"results: {out}")
        if plot:
            console.print(f"plot: {plot_quant(rows, sizes, plot)}")

    @bench.command("compare")
    def compare(
        results: list[Path] = typer.Argument(..., help="Result files from `kiln bench serve|offline --out`."),
    ) -> None:
        """Print figures of several result files side by side, with ratios to the first."""
        from benchmarks.errors import BenchmarkError
        from benchmarks.report import compare_table

        if len(results) < 2:
            raise BenchmarkError("kiln bench compare needs at least two result files")
        _stdout_console().print(compare_table(results))
