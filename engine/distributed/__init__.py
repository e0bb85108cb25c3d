"""Tensor-parallel execution: rank 0 (the engine process) drives N-1 worker processes.

- `executor.TensorParallelExecutor`: what `LLMEngine` uses as its runner when the engine was
  built with `--tp N > 1`; same `execute()` contract as `ModelRunner`.
- `worker`: the worker process (`python -m engine.distributed.worker`), spawned locally by the
  executor, or started by hand on other nodes for multi-node runs.
"""
