"""A synthetic key -> value task for checking a fine-tuning setup end to end.

Each of `num_keys` two-word keys ("lazy fox") gets a random one-word value ("four"). Every key
is asked in three phrasings ("what is", "tell me", "name"); the training file holds two
phrasings of every key, the validation file the third, so validation asks every key in a
phrasing never seen *with that key*: the model must have tied the answer to the key, not to
the sentence. A random base model scores ~0 %.

    python -m training.synthetic -o data/kv --num-keys 50
    kiln finetune --model CKPT --data data/kv/train.jsonl --val-data data/kv/val.jsonl \
        --template "Question: {phrase} {key}? Answer: {value}" -o out/
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TEMPLATE = "Question: {phrase} {key}? Answer: {value}"
PHRASES = ("what is", "tell me", "name", "give me", "recall", "say")
# Single letters: one token each in any byte-level BPE, so a key is one position to attend to.
KEY_SYMBOLS = tuple("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
VALUES = "one two three four five six the over while generate serve with".split()


def key_value_records(num_keys: int = 50, seed: int = 0) -> list[dict[str, str]]:
    """`num_keys` distinct {"key", "value"} pairs, reproducible from `seed`."""
    rng = random.Random(seed)
    if num_keys > len(KEY_SYMBOLS):
        raise ValueError(f"num_keys must be at most {len(KEY_SYMBOLS)}")
    keys = rng.sample(KEY_SYMBOLS, num_keys)
    return [{"key": key, "value": rng.choice(VALUES)} for key in keys]


def split_by_phrasing(records: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, val): key i is validated in phrasing i % 3 and trained in the other two."""
    train: list[dict[str, str]] = []
    val: list[dict[str, str]] = []
    for i, record in enumerate(records):
        for j, phrase in enumerate(PHRASES):
            (val if j == i % len(PHRASES) else train).append({"phrase": phrase, **record})
    return train, val


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_task(out_dir: Path, num_keys: int = 50, seed: int = 0) -> tuple[Path, Path]:
    """Write `train.jsonl` and `val.jsonl` into `out_dir`; returns their paths."""
    train, val = split_by_phrasing(key_value_records(num_keys, seed))
    return write_jsonl(out_dir / "train.jsonl", train), write_jsonl(out_dir / "val.jsonl", val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--num-keys", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, val = write_task(args.out, args.num_keys, args.seed)
    print(f"wrote {train} and {val}; template: {TEMPLATE!r}")


if __name__ == "__main__":
    main()
