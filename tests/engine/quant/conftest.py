"""Fixtures of the quantization tests: a tiny Llama whose widths fit int4 groups of 128, trained
for a few seconds on the shipped calibration text (so quantization error shows in perplexity),
and ModelOpt quantizations of it (fake-quant reference model, unified export, Kiln engine)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import make_checkpoint  # on sys.path via tests/conftest.py

QUANT_ALGOS = ("fp8", "int8_wo", "w8a8_sq", "int4_awq")


def train_briefly(checkpoint: Path, steps: int = 80, seq_len: int = 64, batch: int = 8) -> None:
    """A few AdamW steps of next-token prediction on engine/quant/data/calib.txt, saved in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.build.quantize import DEFAULT_CALIB_FILE, read_texts

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    ids = torch.tensor(tok("\n\n".join(read_texts(DEFAULT_CALIB_FILE))).input_ids)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,))
        x = torch.stack([ids[s:s + seq_len] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(checkpoint))


@pytest.fixture(scope="session")
def quant_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Llama (hidden 128, intermediate 256, GQA), briefly trained: widths divisible by 128."""
    path = make_checkpoint("llama-gqa", tmp_path_factory.mktemp("quant-ckpt"), hidden_size=128,
                           intermediate_size=256)
    train_briefly(path)
    return path


@dataclass
class Quantized:
    algo: str
    reference: Any  # ModelOpt's fake-quant transformers model, resmoothed as the export is
    export_dir: Path  # ModelOpt unified HF checkpoint
    engine_dir: Path  # Kiln engine built from export_dir (float32)


@pytest.fixture(scope="session")
def quantized(quant_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Quantized]:
    """`quantized(algo)` -> ModelOpt quantization of `quant_checkpoint`, made once per session."""
    cache: dict[str, Quantized] = {}

    def make(algo: str) -> Quantized:
        if algo in cache:
            return cache[algo]
        from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
        from transformers import AutoTokenizer

        from engine.build.builder import BuildOptions, build_engine
        from engine.build.quantize import (
            DEFAULT_CALIB_FILE,
            calibration_batches,
            export_modelopt,
            quantize_with_modelopt,
            read_texts,
        )

        tok = AutoTokenizer.from_pretrained(str(quant_checkpoint))
        calib = calibration_batches(tok, read_texts(DEFAULT_CALIB_FILE), 4, 64)
        model = quantize_with_modelopt(quant_checkpoint, algo, calib)
        root = tmp_path_factory.mktemp(f"modelopt-{algo}")
        export_dir = export_modelopt(copy.deepcopy(model), quant_checkpoint, root / "hf")
        requantize_resmooth_fused_llm_layers(model)  # what the export did to its copy
        engine_dir = build_engine(export_dir, root / "engine", BuildOptions(dtype="float32"), progress=False)
        cache[algo] = Quantized(algo, model, export_dir, engine_dir)
        return cache[algo]

    return make
