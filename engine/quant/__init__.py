"""Quantized weights and KV cache: Kiln's packed layouts, the kernels that run them, and the reader
of NVIDIA ModelOpt's unified Hugging Face checkpoint format (`hf_quant_config.json`).

Calibration and quantization themselves are ModelOpt's job (`engine/build/quantize.py`); this
package holds only what runs inside the engine.
"""
