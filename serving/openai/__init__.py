"""Kiln's OpenAI-compatible gateway in front of Triton (FastAPI app + gRPC streaming client).

Start it with `serving.openai.runner.GatewayServer` (or `kiln openai` / `kiln serve`).
"""
