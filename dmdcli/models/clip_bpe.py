"""CLIP byte-level BPE tokenizers built offline from a vocabulary and merges.

The tiny test teachers and the built-in teacher each define their own vocabulary; this module
turns one into a ``CLIPTokenizer`` (and the ``vocab.json`` / ``merges.txt`` files transformers
4 reads), so nothing is downloaded.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

Vocab = dict[str, int]
Merges = list[tuple[str, str]]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable-unicode table (the same one CLIP's tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def byte_symbols() -> list[str]:
    """The base tokens of every CLIP vocabulary: the 256 byte symbols, then each with ``</w>``."""
    symbols = list(bytes_to_unicode().values())
    return symbols + [s + "</w>" for s in symbols]


def write_tokenizer_files(folder: str | Path, vocab: Vocab, merges: Merges) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def clip_tokenizer(vocab: Vocab, merges: Merges, model_max_length: int):
    """A CLIPTokenizer over ``vocab`` / ``merges`` (pad = ``<|endoftext|>``, as SD's)."""
    from transformers import CLIPTokenizer

    kwargs = dict(model_max_length=model_max_length, pad_token=EOS)
    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:
        # transformers 4.x: the (slow) CLIPTokenizer reads vocab.json + merges.txt from disk.
        with tempfile.TemporaryDirectory(prefix="dmd-tok-") as tmp:
            write_tokenizer_files(tmp, vocab, merges)
            return CLIPTokenizer(
                vocab_file=str(Path(tmp) / "vocab.json"), merges_file=str(Path(tmp) / "merges.txt"), **kwargs
            )
    # transformers 5.x: tokenizers-backed CLIPTokenizer built from the same vocab and merges.
    return CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)
