"""The shapes world's CLIP tokenizer, built offline: one token per caption word.

A CLIP-style byte-level BPE (``dmdcli.models.clip_bpe``): the 256 byte symbols and the same
with ``</w>``, then merges that build every word of the world's vocabulary up to a single
end-of-word token, then ``<|startoftext|>`` / ``<|endoftext|>``. Any other text still
tokenizes (into bytes and partial words), so arbitrary prompts do not crash the teacher.
"""

from __future__ import annotations

from pathlib import Path

from dmdcli.models.clip_bpe import BOS, EOS, byte_symbols, clip_tokenizer, write_tokenizer_files
from dmdcli.shapes.world import iter_vocabulary

MAX_TOKEN_LENGTH = 32  # the longest caption is 23 tokens with BOS and EOS; SD uses 77


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab (token → id) and BPE merges, deterministic."""
    tokens = byte_symbols()
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in iter_vocabulary():
        # Extend the merges until BPE (lowest rank first) reduces the word to one token.
        while len(parts := _bpe(word, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in known:
                tokens.append(pair[0] + pair[1])
                known.add(pair[0] + pair[1])
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word: merge the lowest-ranked adjacent pair until none applies."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def write_shapes_tokenizer_files(folder: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder``."""
    return write_tokenizer_files(folder, *vocab_and_merges())


def make_shapes_tokenizer():
    """A CLIPTokenizer (model_max_length 32, pad = ``<|endoftext|>``); no network."""
    return clip_tokenizer(*vocab_and_merges(), model_max_length=MAX_TOKEN_LENGTH)
