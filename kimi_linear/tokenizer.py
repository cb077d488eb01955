"""Tokenizers for generation: the release's tiktoken BPE (``tiktoken.model`` in the checkpoint) or bytes.

* ``TiktokenTokenizer``: BPE ranks read from the local ``tiktoken.model`` (nothing is downloaded), the split
  pattern of the Kimi tokenizer, special tokens after the BPE vocabulary — named from
  ``tokenizer_config.json``'s ``added_tokens_decoder`` when the folder has one, ``<|reserved_token_i|>``
  otherwise.
* ``ByteTokenizer``: one token per UTF-8 byte (0..255) plus bos/eos/pad from the config (the project's own
  small models, vocab 259); prompts start with BOS, as the training documents do (``add_bos``).

Both decode incrementally (``StreamDecoder``), so a streamed multi-byte character is printed once it is
complete.
"""

from __future__ import annotations

import codecs
import json
import os

from kimi_linear.config import KimiLinearConfig

TIKTOKEN_FILE = "tiktoken.model"
NUM_RESERVED_SPECIAL_TOKENS = 256

# The Kimi tokenizer's pre-tokenisation: runs of Han characters, words with their leading punctuation/space
# and English contractions, numbers in groups of up to three digits, punctuation runs, newlines, other
# whitespace.
KIMI_SPLIT_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; ids >= 256 are the config's special tokens (dropped when decoding)."""

    name = "bytes"
    # The project's models are trained on documents that start with BOS (kimi_linear.train.data).
    add_bos = True

    def __init__(self, config: KimiLinearConfig):
        if config.vocab_size < 256:
            raise ValueError(f"a byte-level tokenizer needs vocab_size >= 256, got {config.vocab_size}")
        self.vocab_size = config.vocab_size
        self.bos_token_id, self.eos_token_id = config.bos_token_id, config.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if 0 <= token < 256 else b""

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """The release's BPE tokenizer from a local ``tiktoken.model``.

    Raises:
        ValueError: unreadable ``tiktoken.model`` or a vocabulary larger than the model's.
    """

    name = "tiktoken"

    def __init__(self, directory: str, config: KimiLinearConfig):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = os.path.join(directory, TIKTOKEN_FILE)
        try:
            ranks = load_tiktoken_bpe(path)
        except Exception as e:
            raise ValueError(f"{path} is not a readable tiktoken BPE file: {e}") from None
        n_base = len(ranks)
        specials = {f"<|reserved_token_{i}|>": n_base + i for i in range(NUM_RESERVED_SPECIAL_TOKENS)}
        tok_config = os.path.join(directory, "tokenizer_config.json")
        self.add_bos = False
        if os.path.isfile(tok_config):
            with open(tok_config, encoding="utf-8") as f:
                settings = json.load(f)
            self.add_bos = bool(settings.get("add_bos_token", False))
            added = settings.get("added_tokens_decoder", {})
            named = {entry["content"]: int(i) for i, entry in added.items() if int(i) >= n_base}
            if named:
                specials = {name: i for name, i in specials.items() if i not in named.values()}
                specials.update(named)
        if max(specials.values()) >= config.vocab_size:
            raise ValueError(
                f"tokenizer has {max(specials.values()) + 1} tokens but the model's vocab_size is "
                f"{config.vocab_size}"
            )
        self.encoding = tiktoken.Encoding(
            name="kimi", pat_str=KIMI_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
        self.special_ids = set(specials.values())
        self.vocab_size = config.vocab_size
        self.bos_token_id, self.eos_token_id = config.bos_token_id, config.eos_token_id

    def encode(self, text: str) -> list[int]:
        # User text is text: special-token names inside it are not turned into special tokens.
        return self.encoding.encode(text, disallowed_special=())

    def token_bytes(self, token: int) -> bytes:
        if token in self.special_ids or token >= self.encoding.n_vocab:
            return b""
        return self.encoding.decode_single_token_bytes(token)

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")


class StreamDecoder:
    """Turns tokens into text one at a time, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> str:
        return self.decoder.decode(self.tokenizer.token_bytes(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def load_tokenizer(directory: str | None, config: KimiLinearConfig):
    """``TiktokenTokenizer`` when ``directory`` holds ``tiktoken.model``, else ``ByteTokenizer``."""
    if directory is not None and os.path.isfile(os.path.join(directory, TIKTOKEN_FILE)):
        return TiktokenTokenizer(directory, config)
    return ByteTokenizer(config)
