"""`TensorParallelExecutor`: rank 0 of a tensor-parallel engine, in the engine process.

Rank 0 owns the scheduler (in `LLMEngine`); each step it flattens the batch once
(`ModelRunner.prepare`), broadcasts the `StepBatch` to the N-1 workers over a gloo control group,
and runs its own shard. Row-parallel layers all-reduce, the LM head all-gathers the logits, so
rank 0 has the full logits and samples; workers discard theirs.

Process model: workers are separate Python processes (`python -m engine.distributed.worker`,
i.e. spawn semantics: nothing is inherited but the environment), one GPU each on CUDA (NCCL),
`OMP_NUM_THREADS = cores / N` each on CPU (gloo). Rank 0 hosts the rendezvous TCPStore on
MASTER_ADDR (default 127.0.0.1) : MASTER_PORT (default: a free port).

Multi-node: set MASTER_ADDR to an address of the rank-0 host reachable from the others,
MASTER_PORT to a fixed port, WORLD_SIZE=N, and KILN_TP_LOCAL_RANKS=k (ranks 0..k-1 run on
this node, spawned here); start ranks k..N-1 on the other nodes with
`RANK=r python -m engine.distributed.worker` (same MASTER_*/WORLD_SIZE).

Faults: a watchdog thread polls the local workers; when one exits, the executor records why,
terminates the others, and the next (or current) `execute` raises `TensorParallelError`.
A worker dying mid-collective makes gloo fail on rank 0 at once (the socket closes); every
collective also has a timeout (KILN_TP_TIMEOUT seconds, default 120). Startup waits for every
worker's "ready" with liveness checks (KILN_TP_START_TIMEOUT, default 600 s) and reports the
worker's own error message.

One tensor-parallel engine per process: `torch.distributed`'s default group and
`engine.parallel`'s state are process-wide. `close()` restores both.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.distributed.common import (
    CONTROL_TIMEOUT,
    PG_PREFIX,
    SETUP_KEY,
    TensorParallelError,
    WorkerSetup,
    backend_for,
    env_seconds,
    error_key,
    ready_key,
)
from engine.parallel import get_tp_size, set_parallel_state
from engine.runtime.model_runner import ModelRunner
from engine.runtime.scheduler import ScheduledSequence

logger = logging.getLogger("kiln.tp")

WATCHDOG_INTERVAL_S = 0.1
SHUTDOWN_GRACE_S = 5.0


def _python() -> str:
    """The interpreter for workers (inside Triton's python stub sys.executable is the stub)."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    return shutil.which("python3") or shutil.which("python") or sys.executable


class _Workers:
    """The locally spawned worker processes; safe to stop from any thread, more than once."""

    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def spawn(self, rank: int, world_size: int, addr: str, port: int, threads: int) -> None:
        env = dict(os.environ)
        repo_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
        env.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_RANK=str(rank), KILN_TP_PARENT_PID=str(os.getpid()))
        env.setdefault("OMP_NUM_THREADS", str(threads))
        self.procs[rank] = subprocess.Popen([_python(), "-m", "engine.distributed.worker"], env=env,
                                            stdin=subprocess.DEVNULL)

    def dead(self) -> dict[int, int]:
        """rank -> exit code of every worker that has exited."""
        return {r: p.returncode for r, p in self.procs.items() if p.poll() is not None}

    def wait_any_dead(self, timeout_s: float) -> dict[int, int]:
        """`dead()`, waiting up to `timeout_s` for a first worker to have exited."""
        deadline = time.monotonic() + timeout_s
        while not (dead := self.dead()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return dead

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Wait up to `grace_s` for workers to exit, then terminate, then kill; reap all."""
        with self._lock:
            deadline = time.monotonic() + grace_s
            for p in self.procs.values():
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.terminate()
            for p in self.procs.values():
                try:
                    p.wait(2.0)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


class TensorParallelExecutor:
    """Drop-in for `ModelRunner` when `config.build.tp_size > 1` (same `execute` contract)."""

    def __init__(self, engine_dir: str | Path, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, num_kv_blocks: int) -> None:
        tp = config.build.tp_size
        if dist.is_initialized() or get_tp_size() != 1:
            raise TensorParallelError(
                "this process already runs a tensor-parallel engine (torch.distributed is initialised); "
                "close it first — one tensor-parallel engine per process"
            )
        world = int(os.environ.get("WORLD_SIZE", tp))
        if world != tp:
            raise TensorParallelError(f"WORLD_SIZE={world} but the engine was built with --tp {tp}")
        local = int(os.environ.get("KILN_TP_LOCAL_RANKS", tp))
        if not 1 <= local <= tp:
            raise TensorParallelError(f"KILN_TP_LOCAL_RANKS={local} must be between 1 and {tp}")
        self.tp_size = tp
        self.config = config
        self._failure: str | None = None
        self._closed = False
        self._workers = _Workers()
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ.get("MASTER_PORT", 0))
        start_timeout = env_seconds("KILN_TP_START_TIMEOUT", 600.0)
        collective_timeout = env_seconds("KILN_TP_TIMEOUT", 120.0)
        self._store = dist.TCPStore(addr, port, tp, is_master=True, timeout=timedelta(seconds=start_timeout),
                                    wait_for_workers=False)
        setup = WorkerSetup(str(Path(engine_dir).resolve()), config, device.type, dtype, num_kv_blocks,
                            collective_timeout)
        self._store.set(SETUP_KEY, pickle.dumps(setup))  # type: ignore[arg-type]  # bytes work; stub says str
        threads = max(1, (os.cpu_count() or 1) // local)
        atexit.register(self.close)  # an engine never closed still stops its workers cleanly at exit
        try:
            for rank in range(1, local):
                self._workers.spawn(rank, tp, addr, self._store.port, threads)
            set_parallel_state(0, tp)
            if device.type == "cuda":
                device = torch.device("cuda", device.index or 0)
                torch.cuda.set_device(device)
            self.runner = ModelRunner(engine_dir, config, device, dtype, num_kv_blocks, rank=0)
            self._wait_ready(start_timeout)
            dist.init_process_group(backend_for(device.type), store=dist.PrefixStore(PG_PREFIX, self._store),
                                    rank=0, world_size=tp, timeout=timedelta(seconds=collective_timeout))
            self._control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        except BaseException:
            self._teardown()
            raise
        self.kv_spec = self.runner.kv_spec
        self._watchdog = threading.Thread(target=self._watch, name="kiln-tp-watchdog", daemon=True)
        self._watchdog.start()
        logger.info("tensor parallel: %d ranks (%d local), backend %s", tp, local, backend_for(device.type))

    # ---- ModelRunner contract ------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        """Bytes of rank 0's shard (each rank holds about 1/N of the model)."""
        return self.runner.weight_bytes

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence],
                all_logits: bool = False) -> tuple[torch.Tensor, list[ScheduledSequence]]:
        """As `ModelRunner.execute`; raises TensorParallelError when any rank has failed."""
        self._check()
        batch, sampling = self.runner.prepare(scheduled, all_logits)
        try:
            dist.broadcast_object_list([batch], src=0, group=self._control)
            logits = self.runner.run(batch)
        except Exception as exc:
            # Usually a peer died (its sockets closed): name it rather than the socket error.
            dead = self._workers.wait_any_dead(timeout_s=1.0)
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            self._fail(self._describe_dead(dead) if dead else f"a collective failed ({type(exc).__name__}: {first_line})")
            self._check()
            raise
        self._check()  # a worker that died during the step may have left partial results
        return logits, sampling

    def close(self) -> None:
        """Stop the workers (gracefully when healthy) and reset this process's parallel state.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._failure is None:
            try:
                dist.broadcast_object_list([None], src=0, group=self._control)
            except Exception:  # a worker is already gone: stopping kills the rest
                pass
        self._teardown()

    # ---- faults ----------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed and self._failure is None:
            raise TensorParallelError("the tensor-parallel engine is closed")
        if self._failure is not None:
            raise TensorParallelError(f"tensor-parallel engine failed: {self._failure}; its workers were shut down")

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
            logger.error("tensor parallel: %s; shutting the other ranks down", reason)
        self._workers.stop(grace_s=0.0)

    def _describe_dead(self, dead: dict[int, int]) -> str:
        parts = []
        for rank, code in sorted(dead.items()):
            how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            err = self._store_error(rank)
            parts.append(f"worker rank {rank} {how}" + (f" ({err})" if err else ""))
        return "; ".join(parts)

    def _store_error(self, rank: int) -> str | None:
        try:
            if self._store.check([error_key(rank)]):
                return self._store.get(error_key(rank)).decode(errors="replace")
        except Exception:  # store already torn down
            return None
        return None

    def _watch(self) -> None:
        while not self._closed and self._failure is None:
            dead = self._workers.dead()
            if dead:
                self._fail(self._describe_dead(dead))
                return
            time.sleep(WATCHDOG_INTERVAL_S)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = set(range(1, self.tp_size))
        while pending:
            for rank in sorted(pending):
                err = self._store_error(rank)
                if err is not None:
                    raise TensorParallelError(f"worker rank {rank} failed to start: {err}")
                if self._store.check([ready_key(rank)]):
                    pending.discard(rank)
            dead = {r: c for r, c in self._workers.dead().items() if r in pending}
            if dead:
                raise TensorParallelError(f"tensor-parallel startup failed: {self._describe_dead(dead)}")
            if pending and time.monotonic() > deadline:
                raise TensorParallelError(
                    f"worker rank(s) {sorted(pending)} not ready after {timeout_s:.0f} s "
                    "(remote ranks: start them with `python -m engine.distributed.worker`, see "
                    "engine/distributed/executor.py; or raise KILN_TP_START_TIMEOUT)"
                )
            time.sleep(0.05)

    def _teardown(self) -> None:
        self._closed = True
        atexit.unregister(self.close)
        self._workers.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
        set_parallel_state(0, 1)
