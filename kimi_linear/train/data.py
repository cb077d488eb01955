"""Training data: the embedded corpus, user corpora, byte-level tokens and packed, resumable batches.

The embedded corpus is the Python standard library's own source on this machine — always present, no download.
Documents are deduplicated by content and split into train/validation by a hash of their content, so the split
does not depend on file order and a document never lands on both sides.

Packing: every document becomes ``[BOS] bytes... [EOS]`` and all documents are concatenated into one token
stream. A training window is ``seq_len`` consecutive tokens of that stream; a batch of windows is laid out
along one row (``input_ids [1, B * seq_len]``) with ``cu_seqlens`` marking every window edge and every
document start, so no token attends across a document boundary. Labels are the next token; a label that would
be the first token of another document (a BOS) is ignored (-100).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = -100
# Special ids of the byte-level presets (bytes are 0..255, then BOS, EOS, PAD).
BOS_ID, EOS_ID = 256, 257
BYTE_VOCAB_SIZE = 259


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> list[str]:
    """The standard library's ``.py`` sources (third-party packages and caches excluded), sorted by path."""
    root = stdlib_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue  # a few test fixtures are deliberately not UTF-8
    return docs


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                docs.append(record["text"])
            elif isinstance(record, str):
                docs.append(record)
            else:
                raise ValueError(f'{path}:{lineno}: expected a JSON string or an object with a "text" string')
    return docs


def _read_text_file(path: Path) -> str | None:
    """The file's text, or None when it is binary (has NUL bytes or is not UTF-8)."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_documents(path: str | os.PathLike) -> list[str]:
    """Documents of a corpus: a folder (every UTF-8 text file below it, ``.jsonl`` files one document per
    line), a ``.jsonl`` file (one JSON string or ``{"text": ...}`` object per line) or any other text file
    (one document).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the path cannot be read, a ``.jsonl`` line is malformed, or there is no text at all.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            docs = []
            for f in files:
                if f.suffix == ".jsonl":
                    docs.extend(_read_jsonl(f))
                else:
                    text = _read_text_file(f)
                    if text is not None:
                        docs.append(text)
        elif path.suffix == ".jsonl":
            docs = _read_jsonl(path)
        else:
            text = _read_text_file(path)
            if text is None:
                raise ValueError(f"data file {str(path)!r} is not UTF-8 text")
            docs = [text]
    except PermissionError as e:
        raise ValueError(f"cannot read data path {str(path)!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"data path {str(path)!r} holds a .jsonl file that is not UTF-8") from None
    except OSError as e:
        raise ValueError(f"cannot read data path {str(path)!r}: {e.strerror or e}") from None
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"data path {str(path)!r} holds no text (an empty corpus)")
    return docs


def _content_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deduplicate ``docs`` and split them into (train, validation), deterministically.

    A document goes to validation when the hash of its content falls in the lowest ``val_fraction`` of the
    hash range. When that leaves either side empty (a corpus of a few documents), every document is cut
    instead: its first ``1 - val_fraction`` of characters train, the rest validate.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    seen, unique = set(), []
    for d in docs:
        h = _content_hash(d)
        if h not in seen:
            seen.add(h)
            unique.append((h, d))
    threshold = int(val_fraction * 2**32)
    train = [d for h, d in unique if int.from_bytes(h[:4], "big") >= threshold]
    val = [d for h, d in unique if int.from_bytes(h[:4], "big") < threshold]
    if train and val:
        return train, val
    cut = [(d[: max(1, int(len(d) * (1 - val_fraction)))], d[max(1, int(len(d) * (1 - val_fraction))):])
           for _, d in unique]
    return [a for a, _ in cut], [b for _, b in cut if b]


def tokenize_documents(docs: list[str], bos_token_id: int, eos_token_id: int) -> torch.Tensor:
    """One int16 token stream ``[N]``: ``[BOS] UTF-8 bytes [EOS]`` per document, concatenated."""
    parts = []
    bos = np.array([bos_token_id], dtype=np.int16)
    eos = np.array([eos_token_id], dtype=np.int16)
    for d in docs:
        parts += [bos, np.frombuffer(d.encode("utf-8"), dtype=np.uint8).astype(np.int16), eos]
    if not parts:
        return torch.zeros(0, dtype=torch.int16)
    return torch.from_numpy(np.concatenate(parts))


@dataclass
class Corpus:
    """Train and validation token streams (int16 ``[N]``), where they came from and how many distinct
    documents."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    num_documents: int
    fingerprint: str

    def describe(self) -> str:
        plural = "" if self.num_documents == 1 else "s"
        return (f"{self.source}: {self.num_documents} distinct document{plural}, "
                f"{self.train.numel():,} train / {self.val.numel():,} validation tokens")


def build_corpus(data: str | os.PathLike | None, bos_token_id: int = BOS_ID, eos_token_id: int = EOS_ID,
                 val_fraction: float = 0.02) -> Corpus:
    """Read (``data`` = None: the standard library's source), deduplicate, split and tokenize a corpus into
    byte tokens (``kimi_linear.tokenizer.ByteTokenizer``'s ids) with ``bos_token_id`` / ``eos_token_id``
    around each document.

    The fingerprint hashes the token streams, so a resumed run can tell that its data changed.
    """
    if data is None:
        docs, source = stdlib_documents(), f"Python standard library ({stdlib_root()})"
        if not docs:
            raise ValueError(f"found no standard-library sources under {stdlib_root()}; pass --data")
    else:
        docs, source = load_documents(data), str(data)
    train_docs, val_docs = split_documents(docs, val_fraction)
    train = tokenize_documents(train_docs, bos_token_id, eos_token_id)
    val = tokenize_documents(val_docs, bos_token_id, eos_token_id)
    digest = hashlib.sha256()
    for stream in (train, val):
        digest.update(stream.numpy().tobytes())
    unique = len({_content_hash(d) for d in docs})
    return Corpus(train, val, source, unique, digest.hexdigest()[:16])


def pack_windows(windows: list[torch.Tensor], bos_token_id: int) -> dict[str, torch.Tensor]:
    """Lay windows of ``T + 1`` tokens along one row: ``input_ids [1, sum T]``, ``labels [1, sum T]`` and
    int32 ``cu_seqlens`` at every window edge and every document start (a BOS inside a window)."""
    inputs = torch.cat([w[:-1] for w in windows]).long()
    labels = torch.cat([w[1:] for w in windows]).long()
    labels[labels == bos_token_id] = IGNORE_INDEX
    edges, offset = [0], 0
    for w in windows:
        n = w.numel() - 1
        starts = (w[:-1] == bos_token_id).nonzero().flatten() + offset
        edges.extend(starts.tolist())
        offset += n
        edges.append(offset)
    cu_seqlens = torch.tensor(sorted(set(edges)), dtype=torch.int32)
    return {"input_ids": inputs[None], "labels": labels[None], "cu_seqlens": cu_seqlens}


class PackedBatches:
    """An endless, resumable stream of packed training batches from a token stream.

    The stream is cut into windows of ``seq_len + 1`` tokens (consecutive windows share one token, so every
    position has a label). Each epoch visits the windows in a random order drawn from ``seed`` and the epoch
    number; a step takes the next ``batch_size`` windows (the global batch; the remainder of an epoch is
    dropped). With ``world_size`` processes and ``grad_accum`` micro-steps, process ``rank`` gets its
    ``batch_size // world_size`` windows as ``grad_accum`` packed micro-batches. ``state_dict()`` is the data
    position: (epoch, index into the epoch's order).
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, grad_accum: int = 1, bos_token_id: int = BOS_ID):
        if seq_len < 1 or batch_size < 1 or grad_accum < 1:
            raise ValueError("seq_len, batch_size and grad_accum must be >= 1")
        if batch_size % (world_size * grad_accum):
            raise ValueError(f"batch size {batch_size} must be a multiple of processes x accumulation steps "
                             f"= {world_size} x {grad_accum}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.grad_accum = seed, rank, world_size, grad_accum
        self.bos_token_id = bos_token_id
        self.num_windows = max(0, (tokens.numel() - 1) // seq_len)
        if self.num_windows < batch_size:
            raise ValueError(f"the training corpus has {tokens.numel():,} tokens: {self.num_windows} windows "
                             f"of {seq_len} tokens, fewer than the batch size {batch_size}; use more data or "
                             f"a smaller --seq-len/--batch-size")
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_windows, generator=gen)

    def window(self, i: int) -> torch.Tensor:
        return self.tokens[i * self.seq_len: (i + 1) * self.seq_len + 1]

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches for the next optimizer step (advances the position)."""
        if self.index + self.batch_size > self.num_windows:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        ids = self._order[self.index: self.index + self.batch_size].tolist()
        self.index += self.batch_size
        local = self.batch_size // self.world_size
        mine = ids[self.rank * local: (self.rank + 1) * local]
        micro = local // self.grad_accum
        return [pack_windows([self.window(i) for i in mine[m * micro: (m + 1) * micro]], self.bos_token_id)
                for m in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)


def eval_batches(tokens: torch.Tensor, seq_len: int, max_windows: int, micro_batch: int, *, rank: int = 0,
                 world_size: int = 1, bos_token_id: int = BOS_ID) -> list[dict]:
    """Packed validation micro-batches for this process: up to ``max_windows`` windows spread evenly over the
    stream (a short stream gives one shorter window). Every process gets the same number of micro-batches."""
    n = (tokens.numel() - 1) // seq_len
    if n == 0:
        if tokens.numel() < 2:
            raise ValueError("the validation split has fewer than 2 tokens; use a larger corpus")
        windows = [tokens] * world_size
    else:
        count = min(n, max_windows)
        count = max(world_size, count - count % world_size)
        picks = torch.linspace(0, n - 1, count).round().long().tolist() if n >= count else \
            [i % n for i in range(count)]
        windows = [tokens[i * seq_len: (i + 1) * seq_len + 1] for i in picks]
    mine = windows[rank::world_size]
    return [pack_windows(mine[i: i + micro_batch], bos_token_id) for i in range(0, len(mine), micro_batch)]


def unigram_loss(train_tokens: torch.Tensor, batches: list[dict], vocab_size: int) -> tuple[float, int]:
    """(sum of -log p(label), label count) over ``batches`` under the training stream's unigram distribution
    with add-one smoothing: the loss of a model that ignores context."""
    counts = torch.bincount(train_tokens.long(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    total, n = 0.0, 0
    for b in batches:
        y = b["labels"][b["labels"] != IGNORE_INDEX]
        total += -logp[y].sum().item()
        n += y.numel()
    return total, n
