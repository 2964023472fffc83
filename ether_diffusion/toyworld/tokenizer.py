"""A word-level CLIP BPE vocabulary for the toy world, written as ordinary vocab.json + merges.txt.

Each known word is one token (its merges build it letter by letter); any other word still tokenises into
letters, so every prompt works. Rare identifier tokens (sks, zwx, …) are in the vocabulary but never in base
captions, which is what DreamBooth needs: a token the base model has no meaning for.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from .world import BACKGROUNDS, OBJECT_COLOURS, PATTERN_WORDS, SHAPES, SIZES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
IDENTIFIER_TOKENS = ("sks", "zwx", "qwe", "xjy", "vpk", "ohwx")
EXTRA_WORDS = ("a", "an", "the", "on", "of", "in", "with", "and", "photo", "picture", "background", "shape",
               "object", "big", "tiny", "left", "right", "top", "bottom", "center")
MAX_LENGTH = 32


def vocabulary_words() -> list[str]:
    words = [*EXTRA_WORDS, *SIZES, *OBJECT_COLOURS, *SHAPES, *BACKGROUNDS, *IDENTIFIER_TOKENS,
             *PATTERN_WORDS.values()]
    return list(dict.fromkeys(words))


def build_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP-style BPE tables in which every vocabulary word is a single token."""
    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens: list[str] = [*symbols, *(s + "</w>" for s in symbols)]
    merges: list[str] = []
    for word in vocabulary_words():
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{current} {piece}")
            current += piece
            tokens.append(current)
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, list(dict.fromkeys(merges))


def write_tokenizer(directory: str | Path) -> None:
    """Write vocab.json, merges.txt and the tokenizer config, loadable by `CLIPTokenizer.from_pretrained`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
