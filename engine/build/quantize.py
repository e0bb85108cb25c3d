"""Quantized builds: calibrate and quantize with NVIDIA ModelOpt, export its unified HF checkpoint
(`hf_quant_config.json`), build the Kiln engine from that, and gate it on held-out text.

    checkpoint --mtq.quantize(calibration text)--> fake-quant model --export_hf_checkpoint--> ModelOpt dir
    ModelOpt dir --builder (engine/quant/modelopt_format.py)--> engine (staging)
    accuracy gate: engine vs the unquantized engine on held-out text -> build_report.json["accuracy"]
    --tp N > 1: the gate runs on the tp1 build; the engine written is the N-way build of the same
    ModelOpt dir (its shards hold exactly the tp1 tensors, engine/build/sharding.py)

The gate measures perplexity ratio (quantized / unquantized), top-1 next-token agreement and
greedy-continuation match (mean fraction of greedy tokens equal before the first divergence).
A ppl ratio above the budget (defaults in DEFAULT_BUDGETS) fails the build unless `force`.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from engine.build.options import BuildOptions
from engine.errors import BuildError, CheckpointError

DATA_DIR = Path(__file__).resolve().parent.parent / "quant" / "data"
DEFAULT_CALIB_FILE = DATA_DIR / "calib.txt"
HELDOUT_FILE = DATA_DIR / "heldout.txt"
# Kiln algo -> ModelOpt config name (`modelopt.torch.quantization.<name>`).
MTQ_CONFIGS: dict[str, str] = {
    "fp8": "FP8_DEFAULT_CFG",
    "int8_wo": "INT8_WEIGHT_ONLY_CFG",
    "w8a8_sq": "INT8_SMOOTHQUANT_CFG",
    "int4_awq": "INT4_AWQ_CFG",
    "int4_rtn": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",  # plain round-to-nearest int4 (AWQ's baseline)
}
# Forward passes ModelOpt makes over the calibration data: AWQ-lite caches activation statistics,
# then searches its scales (each linear tries every alpha, so on a CPU that pass dominates).
CALIB_PASSES: dict[str, int] = {"int4_awq": 2}
DEFAULT_BUDGETS: dict[str, float] = {"fp8": 1.02, "int8_wo": 1.02, "int4_awq": 1.06, "w8a8_sq": 1.06}
# ModelOpt's INT8_SMOOTHQUANT_CFG migrates with alpha 1.0 (all of the activation outliers into the
# weights), tuned for its static per-tensor activation scales; Kiln quantizes activations per
# token at run time, which handles outliers itself, so less migration keeps the weights finer.
DEFAULT_SMOOTHQUANT_ALPHA = 0.5
CALIB_SEQ_LEN = 256
GATE_WINDOW = 128  # tokens per held-out window
GATE_WINDOWS = 16
GREEDY_PROMPTS = 8
GREEDY_TOKENS = 16


# --------------------------------------------------------------------------- calibration data


def read_texts(path: str | Path) -> list[str]:
    """Paragraphs of a `.txt` file (blank-line separated) or the `text` fields of a `.jsonl` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: calibration data file not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CheckpointError(f'{path}:{n}: expected an object with a "text" string')
            texts.append(record["text"])
    else:
        texts = [p.strip() for p in raw.split("\n\n")]
    texts = [t for t in texts if t]
    if not texts:
        raise CheckpointError(f"{path}: no text in the calibration data")
    return texts


def calibration_batches(tokenizer: Any, texts: list[str], num_samples: int,
                        seq_len: int = CALIB_SEQ_LEN) -> list[torch.Tensor]:
    """`num_samples` token sequences (1, <= seq_len) made by packing consecutive texts."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + "\n\n").input_ids)
        if len(ids) >= num_samples * seq_len:
            break
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)][:num_samples]
    return [torch.tensor([c]) for c in chunks if len(c) > 1]


# --------------------------------------------------------------------------- ModelOpt


def quantize_with_modelopt(checkpoint_dir: str | Path, algo: str, calib: list[torch.Tensor],
                           group_size: int | None = None, smoothquant_alpha: float | None = None,
                           algorithm: dict[str, Any] | None = None,
                           on_batch: Callable[[], None] | None = None) -> Any:
    """Load the HF checkpoint in float32 and quantize it in place with ModelOpt, calibrating on
    `calib`; return the fake-quantized `transformers` model (ModelOpt's reference).
    `smoothquant_alpha` (w8a8_sq): migration strength, DEFAULT_SMOOTHQUANT_ALPHA when None.
    `algorithm`: settings merged over the ModelOpt config's calibration algorithm (e.g. AWQ's
    `alpha_step`). `on_batch` is called after every calibration forward pass (progress); ModelOpt
    runs the loop CALIB_PASSES[algo] times."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    if algo not in MTQ_CONFIGS:
        raise BuildError(f"unknown quantization {algo!r} (one of {sorted(MTQ_CONFIGS)})")
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch.float32)
    model.eval()
    config = copy.deepcopy(getattr(mtq, MTQ_CONFIGS[algo]))
    if group_size is not None and algo.startswith("int4"):
        quant_cfg = config["quant_cfg"]
        entries = ([e["cfg"] for e in quant_cfg if e.get("quantizer_name") == "*weight_quantizer" and "cfg" in e]
                   if isinstance(quant_cfg, list) else [quant_cfg["*weight_quantizer"]])
        for entry in entries:
            for cfg in entry if isinstance(entry, list) else [entry]:
                if "block_sizes" in cfg:
                    cfg["block_sizes"] = {**cfg["block_sizes"], -1: group_size}

    if algo == "w8a8_sq":
        alpha = DEFAULT_SMOOTHQUANT_ALPHA if smoothquant_alpha is None else smoothquant_alpha
        config["algorithm"] = {"method": "smoothquant", "alpha": alpha}
    if algorithm:
        base = config.get("algorithm")
        config["algorithm"] = {**(base if isinstance(base, dict) else {"method": base}), **algorithm}

    def forward_loop(m: Any) -> None:
        with torch.no_grad():
            for ids in calib:
                m(ids)
                if on_batch is not None:
                    on_batch()

    return mtq.quantize(model, config, forward_loop=forward_loop)


def export_modelopt(model: Any, checkpoint_dir: str | Path, export_dir: str | Path) -> Path:
    """ModelOpt's unified HF checkpoint of `model` in `export_dir`, with the checkpoint's tokenizer files."""
    from modelopt.torch.export import export_hf_checkpoint

    from engine.build.builder import TOKENIZER_FILES

    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        export_hf_checkpoint(model, export_dir=str(export_dir))
    for name in TOKENIZER_FILES:
        if (Path(checkpoint_dir) / name).is_file() and not (export_dir / name).is_file():
            shutil.copy2(Path(checkpoint_dir) / name, export_dir / name)
    return export_dir


# --------------------------------------------------------------------------- accuracy gate


@dataclass(frozen=True)
class GateResult:
    algo: str
    ppl_reference: float
    ppl_quantized: float
    ppl_ratio: float
    top1_agreement: float
    greedy_match: float
    num_tokens: int
    budget: float
    passed: bool

    def describe(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"accuracy gate {verdict} ({self.algo}): ppl {self.ppl_quantized:.3f} vs {self.ppl_reference:.3f} "
                f"(ratio {self.ppl_ratio:.4f}, budget {self.budget:.2f}), top-1 agreement "
                f"{self.top1_agreement:.1%}, greedy match {self.greedy_match:.1%} on {self.num_tokens} held-out tokens")


def _windows(tokenizer: Any, texts: list[str], window: int, count: int) -> list[list[int]]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + "\n\n").input_ids)
        if len(ids) >= window * count:
            break
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window)][:count]


def measure_gate(reference: Any, quantized: Any, algo: str, budget: float, texts: list[str] | None = None,
                 window: int = GATE_WINDOW, num_windows: int = GATE_WINDOWS) -> GateResult:
    """Compare two `engine.LLM`s on held-out text (default: engine/quant/data/heldout.txt)."""
    from engine.sampling_params import SamplingParams

    texts = texts if texts is not None else read_texts(HELDOUT_FILE)
    windows = _windows(reference.tokenizer, texts, window, num_windows)
    nll_ref = nll_q = 0.0
    agree = total = 0
    for ids in windows:
        target = torch.tensor(ids[1:])
        lr = reference.engine.score(ids)[:-1]
        lq = quantized.engine.score(ids)[:-1]
        nll_ref += torch.nn.functional.cross_entropy(lr, target, reduction="sum").item()
        nll_q += torch.nn.functional.cross_entropy(lq, target, reduction="sum").item()
        agree += int((lr.argmax(-1) == lq.argmax(-1)).sum())
        total += len(target)
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
    prompts = [w[: window // 4] for w in windows[:GREEDY_PROMPTS]]
    ref_out = reference.generate(prompts, params)
    q_out = quantized.generate(prompts, params)
    matches = []
    for a, b in zip(ref_out, q_out, strict=True):
        same = 0
        for x, y in zip(a.token_ids, b.token_ids, strict=False):
            if x != y:
                break
            same += 1
        matches.append(same / max(len(a.token_ids), 1))
    ppl_ref, ppl_q = math.exp(nll_ref / total), math.exp(nll_q / total)
    ratio = ppl_q / ppl_ref
    return GateResult(algo, ppl_ref, ppl_q, ratio, agree / total, sum(matches) / len(matches), total, budget,
                      ratio <= budget)


# --------------------------------------------------------------------------- the build


def build_quantized(checkpoint_dir: Path, name: str, output_dir: str | Path | None, options: BuildOptions,
                    show_progress: bool, source: dict[str, Any] | None, start: float) -> Path:
    """Quantize `checkpoint_dir` (a float HF checkpoint) with ModelOpt, build the engine, gate it.

    Raises BuildError when the gate fails (unless options.force) or the input is already quantized.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from engine.build import builder
    from engine.build.checkpoint import read_json
    from engine.llm import LLM
    from engine.quant.modelopt_format import is_modelopt_checkpoint

    algo = options.quantization
    if is_modelopt_checkpoint(checkpoint_dir):
        raise BuildError(f"{checkpoint_dir}: already a ModelOpt-quantized checkpoint; build it without "
                         "--fp8/--int8/--int4-awq/--w8a8")
    console = Console(stderr=True, quiet=not show_progress)
    hf_config = read_json(checkpoint_dir / "config.json") or {}
    dtype = builder._resolve_dtype(options.dtype, hf_config)
    out = Path(output_dir) if output_dir is not None else Path.cwd() / "engines" / f"{name}-{dtype}-{algo}-tp{options.tp_size}"
    builder._check_output(out)
    calib_file = Path(options.calib_data) if options.calib_data else DEFAULT_CALIB_FILE
    texts = read_texts(calib_file)
    budget = options.accuracy_budget or DEFAULT_BUDGETS[algo]

    group_size = options.group_size
    if algo == "int4_awq":
        group_size = _int4_group_size(hf_config, group_size, options.tp_size)
    _check_tp_before_calibration(hf_config, algo, group_size, options.tp_size)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
    calib = calibration_batches(tokenizer, texts, options.calib_size)
    with tempfile.TemporaryDirectory(prefix="kiln-quant-", dir=out.parent if out.parent.exists() else None) as tmp:
        columns = (TextColumn(f"[bold]ModelOpt {MTQ_CONFIGS[algo]}: calibrating on {len(calib)} samples"),
                   BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, disable=not show_progress) as bar:
            task = bar.add_task("calibrate", total=len(calib) * CALIB_PASSES.get(algo, 1))
            model = quantize_with_modelopt(checkpoint_dir, algo, calib, group_size, options.smoothquant_alpha,
                                           on_batch=lambda: bar.advance(task))
        export_dir = Path(options.export_hf) if options.export_hf else Path(tmp) / "modelopt"
        export_modelopt(model, checkpoint_dir, export_dir)
        del model
        plain = BuildOptions(dtype=dtype, max_batch_size=options.max_batch_size, max_seq_len=options.max_seq_len,
                             max_num_tokens=options.max_num_tokens, kv_block_size=options.kv_block_size)
        staging = Path(tmp) / "engine"
        engine_options = replace(plain, kv_cache_dtype=options.kv_cache_dtype, embedding_quant=embedding_quant(options))
        builder._build(export_dir, name, staging, engine_options, show_progress, source, start)
        reference_dir = builder._build(checkpoint_dir, name, Path(tmp) / "reference", plain, False, source, start)
        from engine.config import load_engine_config

        built_len = load_engine_config(staging).build.max_seq_len
        limits = {"max_batch_size": GREEDY_PROMPTS, "max_seq_len": min(GATE_WINDOW * 2, built_len)}
        window = min(GATE_WINDOW, built_len - GREEDY_TOKENS)  # windows and greedy prompts fit a short engine
        if window < 2 * GREEDY_TOKENS:
            raise BuildError(f"--max-seq-len {built_len} is too short for the accuracy gate "
                             f"(a quantized build needs at least {3 * GREEDY_TOKENS})")
        with console.status("[bold]accuracy gate: quantized vs unquantized on held-out text"):
            ref = LLM(reference_dir, **limits)
            quant = LLM(staging, **limits)
            gate = measure_gate(ref, quant, algo, budget, window=window, num_windows=GATE_WINDOWS * GATE_WINDOW // window)
            for llm in (ref, quant):
                llm.engine.close()
        if options.tp_size > 1:  # gated above at tp1; now the requested shards of the same ModelOpt checkpoint
            staging = builder._build(export_dir, name, Path(tmp) / f"engine-tp{options.tp_size}",
                                     replace(engine_options, tp_size=options.tp_size), show_progress, source, start)
        _record(staging, gate, calib_file, len(calib), options, start)
        if not gate.passed and not options.force:
            raise BuildError(f"{gate.describe()}; the engine was not written (pass --force to keep it anyway)")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(out))
    return out


def _check_tp_before_calibration(hf_config: dict[str, Any], algo: str, group_size: int | None, tp_size: int) -> None:
    """BuildError now, not after minutes of calibration, for a --tp the model cannot be split into."""
    from engine.build.sharding import check_tp_split
    from engine.build.transforms import model_config_from_hf
    from engine.config import QuantConfig

    if tp_size > 1:
        check_tp_split(model_config_from_hf(hf_config)[1], tp_size, QuantConfig(algo=algo, group_size=group_size))


def embedding_quant(options: BuildOptions) -> str:
    """The vocab tables' quantization for a build calibrated here: `options.embedding_quant`, with
    "auto" = per-row int8 for the int8 / int4 / w8a8 builds (SmolLM2: ppl ratio 1.002 on its own,
    and a fifth of the model's bytes), none for fp8 (its CPU path dequantizes on the fly)."""
    if options.embedding_quant != "auto":
        return options.embedding_quant
    return "int8" if options.quantization in ("int8_wo", "int4_awq", "w8a8_sq") else "none"


def _int4_group_size(hf_config: dict[str, Any], requested: int | None, tp_size: int = 1) -> int:
    """The int4 group: `requested`, else 128, else the largest of 64 / 32 that divides every
    projection's input width (SmolLM2's hidden size 576 is not a multiple of 128) and, with
    --tp N, each rank's share of the row-parallel inputs (o_proj, down_proj)."""
    widths = [int(hf_config.get("hidden_size", 0)), int(hf_config.get("intermediate_size", 0))]
    heads, head_dim = hf_config.get("num_attention_heads"), hf_config.get("head_dim")
    if heads and head_dim:
        widths.append(int(heads) * int(head_dim))
    attn_width = widths[2] if len(widths) == 3 else widths[0]  # o_proj's input: heads * head_dim
    per_rank = [widths[1] // tp_size, attn_width // tp_size] if tp_size > 1 else []  # whole groups per rank
    if requested is not None:
        bad = [w for w in widths if w % requested]
        if bad:
            raise BuildError(f"--group-size {requested} does not divide the model's projection width(s) {bad}")
        return requested
    for group in (128, 64, 32):
        if all(w % group == 0 for w in widths + per_rank):
            return group
    raise BuildError(f"no int4 group size (128, 64, 32) divides the model's projection widths {widths}")


def _record(engine_dir: Path, gate: GateResult, calib_file: Path, num_samples: int, options: BuildOptions,
            start: float) -> None:
    import time

    path = engine_dir / "build_report.json"
    report = json.loads(path.read_text())
    report["accuracy"] = asdict(gate)
    report["calibration"] = {"file": str(calib_file), "num_samples": num_samples, "quantizer": "nvidia-modelopt",
                             "config": MTQ_CONFIGS[options.quantization], "forced": options.force}
    report["build_seconds"] = round(time.perf_counter() - start, 3)
    path.write_text(json.dumps(report, indent=2) + "\n")
