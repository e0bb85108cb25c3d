"""AWQ against plain round-to-nearest int4 on a model that has learned something (SmolLM2-135M):
AWQ's activation-aware scales must lose less of the gate's perplexity than ModelOpt's INT4
blockwise weight-only quantization, both read and run by Kiln's int4 kernel.

ModelOpt's AWQ-lite search runs every linear once per candidate alpha per calibration sample;
on this CPU that is about a minute per 256-token sample at its default alpha step (0.1), so the
test calibrates on one 128-token sample with a coarser step (0.25); builds use the defaults.
Neither meets the int4 budget (1.06) on this 135M-parameter model: int4 costs it about a third
of its perplexity (README, `kiln bench quant`); the test asks only that AWQ lose less.
"""

from __future__ import annotations

from pathlib import Path

from engine.build.builder import BuildOptions, build_engine
from engine.build.quantize import (
    DEFAULT_BUDGETS,
    DEFAULT_CALIB_FILE,
    calibration_batches,
    export_modelopt,
    measure_gate,
    quantize_with_modelopt,
    read_texts,
)

LIMITS = {"max_batch_size": 8, "max_seq_len": 256}


def test_awq_beats_round_to_nearest_int4_on_smollm2(smollm2_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from engine import LLM

    tok = AutoTokenizer.from_pretrained(str(smollm2_checkpoint))
    calib = calibration_batches(tok, read_texts(DEFAULT_CALIB_FILE), 1, 128)
    plain = build_engine(smollm2_checkpoint, tmp_path / "plain", BuildOptions(dtype="float32", max_seq_len=512),
                         progress=False)
    reference = LLM(plain, **LIMITS)
    gates = {}
    try:
        for algo, algorithm in (("int4_awq", {"alpha_step": 0.25}), ("int4_rtn", None)):
            model = quantize_with_modelopt(smollm2_checkpoint, algo, calib, group_size=64, algorithm=algorithm)
            export = export_modelopt(model, smollm2_checkpoint, tmp_path / f"{algo}-hf")
            del model
            engine = build_engine(export, tmp_path / algo, BuildOptions(dtype="float32", max_seq_len=512),
                                  progress=False)
            quant = LLM(engine, **LIMITS)
            try:
                gates[algo] = measure_gate(reference, quant, algo, DEFAULT_BUDGETS["int4_awq"])
            finally:
                quant.engine.close()
    finally:
        reference.engine.close()
    awq, rtn = gates["int4_awq"], gates["int4_rtn"]
    print(awq.describe(), rtn.describe(), sep="\n")
    assert 1.0 < awq.ppl_ratio < rtn.ppl_ratio, (awq, rtn)
    assert awq.top1_agreement > rtn.top1_agreement
