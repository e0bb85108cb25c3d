"""GGUF (llama.cpp) -> Hugging Face checkpoint, so GGUF builds take the same path as any other.

A GGUF file is a header (metadata key/values, a tensor table) followed by tensor data, each
tensor in some ggml block type. Converting a llama GGUF back to Hugging Face takes:

- the config, from `llama.*` metadata keys;
- the tensors, renamed (`blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`),
  dequantized with the `gguf` package's `gguf.quants.dequantize`, and q/k rows un-permuted:
  llama.cpp's converter reorders each head's rows of q_proj/k_proj from HF's rotate-half rope
  layout to ggml's interleaved one, so we apply the inverse;
- the tokenizer (vocabulary, merges, pre-tokenizer, chat template), rebuilt by `transformers`
  (`PreTrainedTokenizerFast.from_pretrained(dir, gguf_file=...)`).

Kiln reads the header itself instead of using `gguf.GGUFReader` or `transformers`'
GGUF model loader: both parse every vocabulary string through numpy views, which made a
135M-parameter model take ~90 s to load; this reader takes well under a second. Tensors are
converted and written one at a time, so the dequantized model is never all in memory.
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.build.writer import SafetensorsWriter
from engine.config import DTYPES
from engine.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
# llama.cpp tensor name (after `blk.{i}.`) -> HF name (after `model.layers.{i}.`)
LAYER_TENSORS: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# metadata value type id -> struct format (scalars); 8 = string, 9 = array
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (ggml lists the fastest-moving dimension first)
    ggml_type: int
    offset: int  # absolute byte offset in the file


class GGUFFile:
    """A memory-mapped GGUF file: `metadata`, `tensors`, and `read(tensor)` -> float32 array."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise CheckpointError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.metadata, self.tensors = self._parse()
        except (struct.error, UnicodeDecodeError, ValueError) as exc:
            self.close()
            raise CheckpointError(f"{path}: corrupt GGUF header ({exc})") from None

    def _parse(self) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
        buf, pos = self._map, 4
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, pos)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (Kiln reads versions 2 and 3)")
        pos += 20
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key, pos = self._string(pos)
            (value_type,) = struct.unpack_from("<I", buf, pos)
            metadata[key], pos = self._value(pos + 4, value_type)
        infos = []
        for _ in range(tensor_count):
            name, pos = self._string(pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-pos // alignment) * alignment
        tensors = {n: GGUFTensor(n, s, t, data_start + o) for n, s, t, o in infos}
        return metadata, tensors

    def _string(self, pos: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", self._map, pos)
        return self._map[pos + 8 : pos + 8 + length].decode("utf-8"), pos + 8 + length

    def _value(self, pos: int, value_type: int) -> tuple[Any, int]:
        if value_type in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[value_type]
            value = struct.unpack_from(fmt, self._map, pos)[0]
            if value_type == 6:  # float32: keep the decimal it was written from (1e-05, not 9.99999974e-06)
                value = float(repr(np.float32(value)))
            return value, pos + struct.calcsize(fmt)
        if value_type == 8:
            return self._string(pos)
        if value_type == 9:
            item_type, count = struct.unpack_from("<IQ", self._map, pos)
            pos += 12
            if item_type in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[item_type]
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self._map, pos))
                return values, pos + count * struct.calcsize(fmt)
            items = []
            for _ in range(count):
                item, pos = self._value(pos, item_type)
                items.append(item)
            return items, pos
        raise ValueError(f"unknown metadata value type {value_type}")

    def read(self, tensor: GGUFTensor) -> np.ndarray:
        """Dequantize one tensor to float32, shaped `tensor.shape`."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        try:
            qtype = GGMLQuantizationType(tensor.ggml_type)
        except ValueError:
            raise CheckpointError(f"{self.path}: tensor {tensor.name!r} has unknown ggml type {tensor.ggml_type}") from None
        block_size, block_bytes = GGML_QUANT_SIZES[qtype]
        *rows, row_len = tensor.shape
        row_bytes = row_len // block_size * block_bytes
        nbytes = int(np.prod(rows, dtype=np.int64)) * row_bytes
        if tensor.offset + nbytes > len(self._map):
            raise CheckpointError(f"{self.path}: tensor {tensor.name!r} extends past the end of the file (truncated?)")
        raw = np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=tensor.offset).reshape(*rows, row_bytes)
        try:
            values = dequantize(raw, qtype)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {tensor.name!r}: ggml type {qtype.name} cannot be dequantized") from None
        return np.array(values, dtype=np.float32).reshape(tensor.shape)  # a copy: never a view of the mmap

    def close(self) -> None:
        self._map.close()


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation. weight: (num_heads * head_dim, H) -> same shape.

    llama.cpp writes `w.reshape(n, 2, hd // 2, H).swapaxes(1, 2)`: within each head, the two
    rotate-half halves are interleaved. Reading it as (n, hd // 2, 2, H) and swapping back restores HF.
    """
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_config(gguf: GGUFFile) -> dict[str, Any]:
    """The HF `config.json` of a llama GGUF, from its `llama.*` and `tokenizer.ggml.*` metadata."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported; Kiln converts {list(SUPPORTED_GGUF_ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise CheckpointError(f"{gguf.path}: GGUF metadata has no {arch}.{key}")
        return meta[f"{arch}.{key}"]

    if "rope_freqs.weight" in gguf.tensors or f"{arch}.rope.scaling.type" in meta:
        raise CheckpointError(f"{gguf.path}: GGUF rope scaling (rope_freqs / rope.scaling) is not supported")
    num_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count",
                                                                          hidden // num_heads))),
        "vocab_size": int(meta.get(f"{arch}.vocab_size", len(tokens))),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{gguf_key}"])
    return config


def _hf_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    raise CheckpointError(f"GGUF tensor {gguf_name!r} has no Hugging Face llama equivalent")


def convert_gguf(gguf_path: str | Path, output_dir: str | Path, dtype: str = "float32", progress: bool = True) -> Path:
    """Write the Hugging Face checkpoint equivalent to a llama GGUF file into `output_dir`.

    Produces config.json, model.safetensors (dequantized to `dtype`), generation_config.json and
    tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja). Raises
    CheckpointError for a file that is not GGUF, is corrupt, or is not a llama model.
    """
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    path, out = Path(gguf_path), Path(output_dir)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not an empty directory; choose a new output directory")
    gguf = GGUFFile(path)
    created = not out.exists()
    try:
        config = _hf_config(gguf)
        config["dtype"] = dtype
        names = {t: _hf_name(t) for t in gguf.tensors}
        out.mkdir(parents=True, exist_ok=True)
        columns = (TextColumn("[bold]dequantizing GGUF"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, disable=not progress) as bar, SafetensorsWriter(out / "model.safetensors") as writer:
            task = bar.add_task("dequantize", total=len(names))
            for gguf_name, hf_name in names.items():
                weight = gguf.read(gguf.tensors[gguf_name])
                if hf_name.endswith("q_proj.weight"):
                    weight = unpermute_rope_rows(weight, config["num_attention_heads"])
                elif hf_name.endswith("k_proj.weight"):
                    weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
                writer.add(hf_name, torch.from_numpy(np.ascontiguousarray(weight)).to(getattr(torch, dtype)))
                bar.advance(task)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _write_tokenizer(path, out)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)  # no half-written checkpoint left behind
        raise
    finally:
        gguf.close()
    return out


def _write_tokenizer(path: Path, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent.resolve()), gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for tokenizers it cannot rebuild
        raise CheckpointError(f"{path}: cannot rebuild its tokenizer from the GGUF metadata ({exc})") from None
    tokenizer.save_pretrained(str(out))


@contextmanager
def gguf_as_hf_checkpoint(gguf_path: str | Path, progress: bool = True) -> Iterator[Path]:
    """Convert a GGUF file into a temporary HF checkpoint directory (float32), removed on exit."""
    scratch = Path(tempfile.mkdtemp(prefix="kiln-gguf-"))
    try:
        yield convert_gguf(gguf_path, scratch / "checkpoint", dtype="float32", progress=progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
