"""Benchmark results as saved to and read from `--out` JSON.

Serve results::

    {"kiln_bench": 1, "kind": "serve", "config": {...every flag...}, "environment": {...},
     "serving_backend": "kiln" | "vllm" | "hf" | null,
     "runs": [{"request_rate": 4.0 | "inf", "max_concurrency": 16 | null, "burstiness": 1.0,
               "interrupted": false, "metrics": {...BenchmarkMetrics...},
               "server_metrics": {...} | null, "records": [{...RequestRecord...}, ...]}]}

Offline results have `"kind": "offline"` and `"results"` instead of `"runs"` (see
`benchmarks.offline`). `serving_backend` is what served the model, as the server said
(Triton's model config, the OpenAI gateway's /models); null when it did not say. JSON has no infinity, so an infinite request rate is the string "inf".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.errors import BenchmarkError
from benchmarks.metrics import BenchmarkMetrics, RequestRecord

SCHEMA_VERSION = 1


def rate_to_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def rate_from_json(rate: float | str) -> float:
    return math.inf if rate == "inf" else float(rate)


def format_rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


@dataclass
class RunResult:
    """One point of a sweep: the load it ran under and what was measured."""

    request_rate: float
    max_concurrency: int | None
    burstiness: float
    metrics: BenchmarkMetrics
    records: list[RequestRecord]
    interrupted: bool = False
    server_metrics: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        parts = [f"rate={format_rate(self.request_rate)}"]
        if self.max_concurrency is not None:
            parts.append(f"conc={self.max_concurrency}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_rate": rate_to_json(self.request_rate),
            "max_concurrency": self.max_concurrency,
            "burstiness": self.burstiness,
            "interrupted": self.interrupted,
            "metrics": self.metrics.to_dict(),
            "server_metrics": self.server_metrics,
            "records": [r.to_dict() for r in self.records],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunResult:
        return cls(
            request_rate=rate_from_json(raw["request_rate"]),
            max_concurrency=raw.get("max_concurrency"),
            burstiness=float(raw.get("burstiness", 1.0)),
            metrics=BenchmarkMetrics.from_dict(raw["metrics"]),
            records=[RequestRecord.from_dict(r) for r in raw.get("records", [])],
            interrupted=bool(raw.get("interrupted", False)),
            server_metrics=raw.get("server_metrics"),
        )


@dataclass
class ServeReport:
    """Everything `kiln bench serve` measured in one invocation."""

    config: dict[str, Any]
    environment: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)
    serving_backend: str | None = None

    @property
    def interrupted(self) -> bool:
        return any(run.interrupted for run in self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kiln_bench": SCHEMA_VERSION,
            "kind": "serve",
            "config": self.config,
            "environment": self.environment,
            "serving_backend": self.serving_backend,
            "runs": [run.to_dict() for run in self.runs],
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def load_result(path: str | Path) -> dict[str, Any]:
    """Read a result file written by `kiln bench serve|offline --out`, checking its kind."""
    file = Path(path)
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise BenchmarkError(f"{file}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("kiln_bench") != SCHEMA_VERSION or raw.get("kind") not in (
        "serve", "offline"
    ):
        raise BenchmarkError(f"{file}: not a result written by `kiln bench serve --out` or `kiln bench offline --out`")
    return raw


def load_serve_report(raw: dict[str, Any]) -> ServeReport:
    return ServeReport(
        config=raw.get("config", {}),
        environment=raw.get("environment", {}),
        runs=[RunResult.from_dict(r) for r in raw.get("runs", [])],
        serving_backend=raw.get("serving_backend"),
    )
