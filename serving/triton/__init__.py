"""Kiln behind a real Triton Inference Server.

- `launcher`: run the `tritonserver` binary from the nvidia-pytriton wheel (`TritonServer`).
- `repository`: write a model repository for an engine (`kiln repo`).
- `request`: parse TensorRT-LLM-style request tensors into a prompt and `SamplingParams`.
- `model`: the python-backend model (one `AsyncLLM` per model instance).
"""
