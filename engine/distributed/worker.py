"""A tensor-parallel worker: loads its rank file, joins the process group, and runs every step
rank 0 broadcasts until rank 0 says stop (or goes away).

Started by `TensorParallelExecutor` for local ranks; for ranks on other nodes start it by hand::

    MASTER_ADDR=<rank-0 host> MASTER_PORT=<port> WORLD_SIZE=<N> RANK=<r> [LOCAL_RANK=<gpu>] \\
        python -m engine.distributed.worker

It reads the engine directory, config and device type from rank 0's store, so the engine
directory must exist at the same path on every node.

Lifecycle (protocol with `executor.py`):
1. connect to the TCPStore at MASTER_ADDR:MASTER_PORT, read `WorkerSetup`;
2. build the model and load `rank{r}.safetensors`; publish `kiln/ready/{r}` (or
   `kiln/error/{r}` with the reason, then exit 1);
3. join the process group (data collectives) and a gloo control group;
4. loop: receive a `StepBatch` (or None = stop) on the control group, run it.
A worker started by a local executor also exits when its parent process disappears.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.distributed.common import (
    CONTROL_TIMEOUT,
    PG_PREFIX,
    SETUP_KEY,
    WorkerSetup,
    backend_for,
    error_key,
    ready_key,
    worker_device,
)
from engine.parallel import set_parallel_state

STORE_CONNECT_TIMEOUT = timedelta(seconds=60)


def _watch_parent(parent_pid: int) -> None:
    """Exit at once when the process that spawned us is gone (no orphans)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.5)


def run_worker(master_addr: str, master_port: int, rank: int, world_size: int) -> int:
    store = dist.TCPStore(master_addr, master_port, world_size, is_master=False, timeout=STORE_CONNECT_TIMEOUT)
    try:
        setup: WorkerSetup = pickle.loads(store.get(SETUP_KEY))
        set_parallel_state(rank, world_size)
        device = worker_device(setup.device_type, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        from engine.runtime.model_runner import ModelRunner

        runner = ModelRunner(setup.engine_dir, setup.config, device, setup.dtype, setup.num_kv_blocks, rank=rank)
    except BaseException as exc:  # report any startup failure to rank 0, then exit
        store.set(error_key(rank), f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        return 1
    store.set(ready_key(rank), "1")
    dist.init_process_group(
        backend_for(setup.device_type),
        store=dist.PrefixStore(PG_PREFIX, store),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=setup.collective_timeout_s),
    )
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    try:
        while True:
            box: list[object] = [None]
            dist.broadcast_object_list(box, src=0, group=control)
            batch = box[0]
            if batch is None:
                return 0
            runner.run(batch)  # type: ignore[arg-type]
    finally:
        dist.destroy_process_group()


def main() -> None:
    env = os.environ
    try:
        addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    except (KeyError, ValueError) as exc:
        print(f"kiln tp worker: set MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK ({exc})", file=sys.stderr)
        sys.exit(2)
    parent = env.get("KILN_TP_PARENT_PID")
    if parent is not None:
        threading.Thread(target=_watch_parent, args=(int(parent),), daemon=True).start()
    threads = env.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    try:
        code = run_worker(addr, port, rank, world_size)
    except Exception as exc:  # a failed collective (rank 0 gone, timeout): one line, exit non-zero
        print(f"kiln tp worker rank {rank}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip torch's slow interpreter teardown: nothing is left to flush or free


if __name__ == "__main__":
    main()
