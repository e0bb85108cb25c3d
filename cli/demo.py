"""`make demo`: the main job end to end on the embedded default model (SmolLM2-135M-Instruct).

Build the engine (reused when already built), generate in-process, serve it from a real
Triton server and query it, then a short offline benchmark against Hugging Face.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from cli.errors import err_console
from engine.errors import KilnError

console = Console()
ENGINE_DIR = Path("engines/SmolLM2-135M-Instruct-float32-tp1")


def build_default_engine() -> Path:
    from engine.build.builder import BuildOptions, build_engine
    from engine.build.default_model import default_checkpoint_path
    from engine.config import is_engine_dir

    if is_engine_dir(ENGINE_DIR):
        console.print(f"engine already built: {ENGINE_DIR}")
        return ENGINE_DIR
    source = default_checkpoint_path()
    console.print(f"building {ENGINE_DIR} from {source}")
    return Path(build_engine(source, ENGINE_DIR, BuildOptions(dtype="float32", max_seq_len=2048)))


def main() -> None:
    try:
        run()
    except KilnError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None


def run() -> None:
    from engine.generate import GenerateRequest, run_generate
    from engine.llm import LLM

    console.print(Rule("1. build-engine"))
    engine_dir = build_default_engine()

    console.print(Rule("2. kiln generate (in-process)"))
    llm = LLM(engine_dir)
    for question in ("What is the capital of France?", "Write a haiku about a kiln."):
        result = run_generate(GenerateRequest(engine_dir, question, max_tokens=64, chat=True), llm=llm)
        console.print(f"[bold]{question}[/]\n{result.text}", highlight=False)
        console.print(f"[dim]{result.num_output_tokens} tokens, TTFT {result.ttft_s * 1000:.0f} ms, "
                      f"{result.decode_tokens_per_s:.1f} tokens/s decode[/]")
    del llm

    console.print(Rule("3. kiln serve (real tritonserver, gRPC streaming + HTTP generate)"))
    from cli.demo_serve import run_serve_demo

    run_serve_demo(engine_dir, console)


if __name__ == "__main__":
    main()
