"""The vLLM row of `kiln bench offline`, run by vLLM's own interpreter (`.venv-vllm`).

vLLM cannot be imported in Kiln's environment (it pins numpy 2 and transformers < 5.20), so
`benchmarks.offline` runs this file as a script with the interpreter that
`serving.backends.vllm.vllm_python()` finds. It imports only the standard library and vLLM.

    python -P benchmarks/vllm_offline.py JOB.json

JOB.json: {"checkpoint", "dtype", "prompts": [[token ids]...], "output_len", "warmup",
"num_iters", "threads", "seed", "max_model_len"}. The timing loop is the one of
`benchmarks.offline` (warm-up runs of min(4, output_len) tokens, then per iteration a 1-token
run and a full run), under the same fairness rules: the same token-id prompts, greedy,
exactly `output_len` tokens (`ignore_eos`), the same dtype and thread count, prefix caching
off. Stdout carries one `KILN_PROGRESS <what>` line per run and finally
`KILN_RESULT {"load_s", "prefill_s": [...], "total_s": [...], "counts": [[...]...]}`
(`counts`: new tokens per prompt of each full run); vLLM's own logs go to stderr.

The parent side, `measure_in_vllm_env`, lives here too (one protocol, one file); it imports
Kiln only inside the function, so the script never does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROGRESS = "KILN_PROGRESS "
RESULT = "KILN_RESULT "
NOT_INSTALLED = "not installed: run make vllm"
DEFAULT_KV_CACHE_GIB = "2"


def measure_in_vllm_env(job: dict[str, Any], on_progress: Callable[[str], None]) -> tuple[str, dict[str, Any] | None]:
    """Run `job` with vLLM's interpreter; ("ok", KILN_RESULT dict) or (why not, None).

    The interpreter is `serving.backends.vllm.vllm_python()` ($KILN_VLLM_PYTHON, "" = off, else
    `.venv-vllm`). `on_progress` gets each KILN_PROGRESS text. The child and vLLM's engine
    process run in their own session, killed when this returns or raises (Ctrl-C included);
    `threads` also binds vLLM's OpenMP threads to cores 0..threads-1. A failure keeps vLLM's
    log in a temporary file named in the status.
    """
    import subprocess

    from serving.backends.vllm import vllm_python

    python = vllm_python()
    if python is None:
        return NOT_INSTALLED, None
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_CACHE_GIB),
           "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "kiln-vllm"))}
    env.pop("VIRTUAL_ENV", None)
    if job.get("threads"):
        env["OMP_NUM_THREADS"] = str(job["threads"])
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{int(job['threads']) - 1}")
    with tempfile.TemporaryDirectory(prefix="kiln-vllm-bench-") as tmp:
        job_path, log_path = Path(tmp) / "job.json", Path(tmp) / "vllm.log"
        job_path.write_text(json.dumps(job))
        with log_path.open("w") as log:
            process = subprocess.Popen([str(python), "-P", str(Path(__file__).resolve()), str(job_path)],
                                       stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=tmp,
                                       start_new_session=True)
            result = None
            try:
                assert process.stdout is not None
                for line in process.stdout:
                    if line.startswith(PROGRESS):
                        on_progress(line[len(PROGRESS):].strip())
                    elif line.startswith(RESULT):
                        result = json.loads(line[len(RESULT):])
                code = process.wait()
            finally:
                _kill_session(process.pid)
                process.wait()
        if code == 0 and result is not None:
            return "ok", result
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        kept = tempfile.NamedTemporaryFile(prefix="kiln-vllm-bench-", suffix=".log", delete=False)  # noqa: SIM115
        kept.write(log_path.read_bytes())
        kept.close()
        last = tail[-1].strip()[:160] if tail else "no output"
        return f"failed: vLLM exited with code {code} ({last}); log: {kept.name}", None


def _kill_session(pid: int) -> None:
    """SIGKILL every process of the session led by `pid` (vLLM's engine core included)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _say(prefix: str, text: str) -> None:
    print(prefix + text, flush=True)


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Load vLLM's offline `LLM` on the job's checkpoint and time it (seconds per run)."""
    if job.get("threads"):
        import torch

        torch.set_num_threads(int(job["threads"]))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=job["checkpoint"], dtype=job["dtype"], seed=job["seed"], enable_prefix_caching=False,
              max_model_len=job["max_model_len"])
    load_s = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]

    def generate(max_tokens: int) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [len(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    for _ in range(job["warmup"]):
        _say(PROGRESS, "warm-up")
        generate(min(4, job["output_len"]))
    prefills, totals, counts = [], [], []
    for _ in range(job["num_iters"]):
        _say(PROGRESS, "prefill")
        begin = time.perf_counter()
        generate(1)
        prefills.append(time.perf_counter() - begin)
        _say(PROGRESS, "generate")
        begin = time.perf_counter()
        counts.append(generate(job["output_len"]))
        totals.append(time.perf_counter() - begin)
    return {"load_s": load_s, "prefill_s": prefills, "total_s": totals, "counts": counts}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} JOB.json", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        job = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    _say(RESULT, json.dumps(run(job)))
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file
    sys.exit(main(sys.argv))
