"""Kiln's benchmark harness.

- `benchmarks.serve`: `kiln bench serve`, an asyncio load generator against Triton (gRPC streaming,
  HTTP generate_stream) or any OpenAI-compatible server, with vLLM's metric definitions.
- `benchmarks.offline`: `kiln bench offline`, in-process throughput of Kiln vs Hugging Face
  `generate` (and vLLM where installed), with the memory-bandwidth roofline (MBU).
- `benchmarks.report` / `benchmarks.plots`: rich tables, JSON, CSV, comparisons and PNG plots.
"""
