"""The serving engine: continuous batching on KDA state slots over a paged MLA latent cache, chunked prefill and
exact prefix caching (issue 23). The HTTP layer (``serve.api``) drives it through ``add_request`` / ``abort`` /
``step``; the contract is that every greedy completion equals ``generate()`` on that prompt alone.

Memory (one ``KimiLinearCache.pooled``):

* KDA conv tails and states live in slots ``[num_slots, ...]``: ``max_num_seqs`` slots for running sequences,
  ``num_snapshots`` for prefix-cache snapshots, and one scratch slot that CUDA-graph padding rows write to.
* MLA latents live in blocks of ``block_size`` tokens ``[num_blocks + 1, block_size, ...]`` (the last block is
  scratch). A sequence's block table lists its blocks in order, so memory follows actual lengths. A request is
  admitted only when the free (or evictable) blocks cover the worst case of every admitted request (prompt +
  max_tokens); blocks are taken lazily as the sequence grows, and a finished request returns its unused share.

A step (``step``):

1. admit waiting requests while a slot is free and their worst-case blocks fit; look their prompt up in the
   prefix cache (``prefix_cache.PrefixCache``) and restore the hit's KDA snapshot into the new slot (or zero
   the slot);
2. launch one decode step for every sequence that has finished its prompt: one token each (on CUDA one
   graph replay, graphs captured per batch-size bucket at start);
3. launch the prefill pieces of the sequences still in their prompt, packed varlen into one forward, within
   the step's token budget (``max_num_batched_tokens`` minus the decode tokens). A piece ends on a block
   boundary unless it ends the prompt; with prefix caching the last full block boundary of the prompt also
   ends a piece, so its state can be snapshotted. A piece that ends the prompt samples the first token;
4. read back the tokens the previous iteration launched (the GPU meanwhile runs this one's forwards), emit
   them and retire the finished sequences (slot and blocks freed at once);
5. register the sequences' newly filled blocks in the prefix cache and snapshot the KDA slot at the block
   boundary a piece or a decode step ended on. Inside a piece, the forward itself leaves snapshots every
   ``snapshot_interval`` prompt tokens (from the chunk kernel's per-chunk states), so a later prompt that
   branches off a shared prefix where no piece ended still starts near its branch point.

Running one iteration ahead: a decode step reads each row's input token from ``next_tokens`` (per slot, on the
device), where the forward that sampled it left it, so the host launches iteration N before it has read N-1's
tokens, and every host-to-device copy goes through pinned memory without waiting for the GPU. A request that
samples a stop token in N-1 has been stepped once more in N; that token is dropped and the extra latent and state
update stay inside its own slot and blocks, which the next owner overwrites. A request is not stepped past
``max_tokens``.

Exactness: a sequence's computation never depends on its batch neighbours (packed varlen prefill, per-row
decode, its own slot and blocks); the prefix cache restores exactly the state and latents the prefix
produced. Sampling takes one uniform number per token from the request's own ``random.Random`` (seeded by
``SamplingParams.seed``) and samples every row of a step in one batch (``generate.sample_rows``), so sampled
tokens do not depend on the batch either.

Log probabilities (``SamplingParams.logprobs``): those of the model's own distribution, log_softmax of the
step's fp32 logits, before temperature, top-k and top-p (what vLLM reports by default), for the chosen token and
the ``logprobs`` most likely ones; computed on the device in the same iteration and read back with the tokens.
``SamplingParams.prompt_logprobs`` asks the same of every prompt token after the first (an evaluation harness
scoring a text): computed from each prefill piece's hidden states, ``PROMPT_LOGPROBS_ROWS`` positions at a time,
and given out with the request's first token. Such a request computes its whole prompt (no prefix-cache hit:
a cached prefix has no logits), and still fills the cache for others.

Penalties (``SamplingParams.repetition_penalty``, ``frequency_penalty``, ``presence_penalty``; ``apply_penalties``)
and ``logit_bias`` change a request's logits before its token is chosen, greedy or sampled. Each sequence slot
keeps, on the device, how often each token was generated and which tokens its prompt holds; a step updates them
for the tokens it chooses, so no host read is needed. Log probabilities stay those of the model's own
distribution.
"""

from __future__ import annotations

import math
import random
import threading
import time
import traceback
import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from kimi_linear.cache import STATE_DTYPES, KimiLinearCache, StateSnapshots, cache_bytes
from kimi_linear.config import KimiLinearConfig
from kimi_linear.generate import decode_step, piece_step, sample_rows, validate_sampling
from kimi_linear.ops.varlen import remember_host_values
from kimi_linear.serve.prefix_cache import PrefixCache

KDA_CHUNK = 64  # prefix-cache boundaries are multiples of the KDA chunk kernel's chunk size
MAX_LOGPROBS = 20  # most likely tokens a request may ask for with each token (the OpenAI API's limit)
PROMPT_LOGPROBS_ROWS = 1024  # prompt positions whose [rows, vocab] logits exist at once (prompt_logprobs)
# A step whose prefill pieces are all at most this long runs them as one padded piece (``piece_step``): on CUDA one
# graph replay per step instead of a forward launched op by op from Python. A prefix-cache hit's rest of a block
# and a short chat turn are such pieces.
PIECE_TOKENS = 64


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. Raises ValueError on construction for values out of range."""

    max_tokens: int = 16  # >= 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # per-request generator: same seed -> same tokens, whatever the batch
    stop_token_ids: tuple[int, ...] = ()  # ids that end the request ("stop"); eos added unless ignore_eos
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's log probability and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    repetition_penalty: float = 1.0  # > 0; 1 = off: tokens of the prompt or the output scaled (apply_penalties)
    frequency_penalty: float = 0.0  # [-2, 2]; per earlier occurrence in the output
    presence_penalty: float = 0.0  # [-2, 2]; once a token occurs in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to its logit

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        validate_sampling(self.temperature, self.top_k, self.top_p)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be ints, got {self.stop_token_ids!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {k!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        r = self.repetition_penalty
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 < r < float("inf"):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {r!r}")
        for entry in self.logit_bias:
            if (not isinstance(entry, tuple) or len(entry) != 2 or not isinstance(entry[0], int)
                    or isinstance(entry[0], bool) or entry[0] < 0 or not isinstance(entry[1], (int, float))
                    or not -100 <= entry[1] <= 100):
                raise ValueError(f"logit_bias entries must be (token id >= 0, bias in [-100, 100]), got {entry!r}")

    @property
    def penalized(self) -> bool:
        """Whether the logits change before the choice: a penalty or a logit bias."""
        return (self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0
                or bool(self.logit_bias))


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor, repetition: torch.Tensor,
                    frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Penalised ``logits [N, V]`` (fp32): ``counts [N, V]``, how often each token was generated so far;
    ``in_prompt [N, V]`` bool, the prompt's tokens; per-row ``repetition``, ``frequency``, ``presence`` ``[N]``.

    A token of the prompt or the output has its logit divided by ``repetition`` if positive, multiplied by it if
    not (the form of Keskar et al. 2019, as transformers and vLLM apply it); then every logit loses
    ``frequency * count + presence * (count > 0)`` (OpenAI's definition, output tokens only)."""
    seen = in_prompt | (counts > 0)
    r = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


@dataclass(frozen=True)
class EngineConfig:
    """Engine sizes. ``num_blocks`` None: ``max_num_seqs * ceil(max_model_len / block_size)`` on the CPU, or
    what ``gpu_memory_fraction`` of the GPU leaves after the weights and the slots on CUDA.
    ``num_snapshots`` None: ``4 * max_num_seqs`` KDA snapshot slots for the prefix cache (0 when it is off).
    ``snapshot_interval``: with prefix caching, a prefill piece also leaves snapshots of its KDA states at the
    prompt positions that are multiples of it (a multiple of ``block_size``; the forward writes them from the
    chunk kernel's per-chunk states, no extra forward), besides the piece ends. A later prompt that shares a
    prefix with this one but branches off elsewhere then recomputes at most this many tokens of the shared
    part, not all of it.
    ``kda_state_dtype``: the KDA recurrent states' dtype in the slot pool, torch.float32 or torch.bfloat16 (half
    the state bytes per decode step; ``cache.KimiLinearCache``). Snapshots copy slots in that dtype.
    ``max_num_batched_tokens``: the tokens one step may run (decode rows + prefill pieces). A larger budget runs
    prompts in fewer, more efficient forwards (a prefill forward has a fixed cost of several hundred kernel
    launches) and so lowers TTFT under load; each step that carries a piece also delays the running streams'
    next token by its time."""

    max_num_seqs: int = 16  # concurrently running sequences = KDA state slots
    max_model_len: int = 4096  # prompt + generated tokens per sequence
    block_size: int = 64  # MLA latent tokens per block = prefix-cache granularity (multiple of 64)
    num_blocks: int | None = None
    gpu_memory_fraction: float = 0.9
    max_num_batched_tokens: int = 16384  # per-step token budget: decode tokens + prefill-piece tokens
    max_queue: int = 256  # waiting requests; more -> QueueFullError
    enable_prefix_caching: bool = True
    use_cuda_graph: bool = True
    num_snapshots: int | None = None
    snapshot_interval: int = 2048  # a prefill also snapshots its KDA states every this many prompt tokens
    kda_state_dtype: torch.dtype = torch.float32


class QueueFullError(RuntimeError):
    """``max_queue`` requests are already waiting."""


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int | None  # the new token (None on a finish-only event such as abort/error)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" (with .error text)
    prompt_tokens: int = 0  # set on the finishing event (usage)
    completion_tokens: int = 0  # set on the finishing event
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None
    logprob: float | None = None  # the token's log probability, if the request asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # (id, log probability), most likely first
    # on the first token's event, with prompt_logprobs: (log probability, top) of prompt tokens 1 .. P - 1
    prompt_logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] | None = None


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    num_slots: int
    free_slots: int
    num_blocks: int
    free_blocks: int  # MLA latent pool use
    prefix_cache_queries: int  # in tokens: prompt tokens looked up
    prefix_cache_hits: int  # in tokens: prompt tokens served from the cache
    generated_tokens_total: int
    prompt_tokens_total: int
    prefill_tokens_total: int  # prompt tokens computed by prefill pieces (not those served from the prefix cache)
    finished_requests_total: int
    steps_total: int = 0  # engine iterations that ran a forward
    prefill_steps_total: int = 0  # of those, the ones that carried prefill pieces
    step_seconds_total: float = 0.0  # wall time inside those iterations (launch, the previous one's tokens, ...)


@dataclass
class _Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    stop: frozenset[int]
    rng: random.Random | None  # the request's sampling draws (None: greedy)
    arrival: float
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    slot: int = -1
    blocks: list[int] = field(default_factory=list)
    reserve: int = 0  # blocks this sequence may need in the worst case
    computed: int = 0  # tokens whose latents / state are in the cache
    cached_tokens: int = 0
    node: int = 0  # prefix-cache node of the last registered full block (0 = root)
    registered: int = 0  # full blocks registered in the prefix cache
    branch: int = 0  # tokens of the prompt the prefix cache holds latents for (a piece ends there)
    decode_node: int = 0  # the node of the snapshot at the last block boundary its generated tokens crossed
    pending: int = 0  # tokens launched but not yet read back (at most one)
    done: bool = False  # finished: tokens still in flight for it are dropped
    prompt_scores: list = field(default_factory=list)  # prompt logprobs on their way to the host, per piece
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # the logit bias's (ids, values) on the device

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)

    @property
    def completion(self) -> int:
        return len(self.tokens) - len(self.prompt)


def _bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return [*sizes, max_num_seqs]


@dataclass
class _Launched:
    """What one iteration launched: ``(sequences, their tokens in host memory, their log probabilities or
    None)`` per forward, and the CUDA event after which the host copies are complete (None on the CPU, where they
    already are). The log probabilities are ``(rows, chosen [m], top values [m, k], top ids [m, k])`` for the
    ``m`` rows that asked for them."""

    rows: list[tuple[list[_Sequence], torch.Tensor, tuple | None]] = field(default_factory=list)
    event: torch.cuda.Event | None = None


class _DecodeGraph:
    """``decode_rows`` for up to ``size`` rows captured in a CUDA graph.

    A step's host inputs (state slots, lengths) travel in one ``[2, size]`` pinned buffer and one copy that does
    not wait for the GPU; the graph gathers each row's input token from the engine's per-slot ``next_tokens``
    (where the step before left it, on the device) and its block table from the engine's device tables (a
    sequence's table row is its slot). Padding rows point at the scratch slot, and through it at the last
    block-table row (all scratch). Two host buffers alternate, so the one being written was copied two steps
    ago (the engine has waited for the step before)."""

    def __init__(self, engine: Engine, size: int):
        device = engine.device
        self.size = size
        self.padding = np.array([engine.scratch_slot, 0], dtype=np.int64)[:, None]
        pin = device.type == "cuda"
        self.hosts = [torch.empty((2, size), dtype=torch.long, pin_memory=pin) for _ in range(2)]
        for h in self.hosts:
            h.numpy()[:] = self.padding
        self.turn = 0
        self.inputs = self.hosts[0].to(device)
        self.engine = engine
        self.capture()

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step over the static inputs: ``(logits [size, V] fp32, their argmax [size])``."""
        slots, lengths = self.inputs.unbind(0)
        return self.engine.decode_rows(slots, lengths)

    def capture(self) -> None:
        """Warm up (compiles kernels, settles allocations) outside the graph, then capture ``run``; sets
        ``replay``, ``logits`` and ``greedy``."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.greedy = self.run()
        self.replay = self.graph.replay

    def __call__(self, slots: list[int], lengths: list[int]):
        """Replay for ``n = len(slots)`` rows: ``(logits [n, V] fp32, greedy tokens [n])`` on the device."""
        n = len(slots)
        self.turn ^= 1
        host = self.hosts[self.turn]
        view = host.numpy()
        view[:, :n] = (slots, lengths)
        view[:, n:] = self.padding
        self.inputs.copy_(host, non_blocking=True)
        self.replay()
        return self.logits[:n], self.greedy[:n]


class _PieceRunner:
    """The prefill pieces of one step, each at most ``PIECE_TOKENS`` long, as one padded piece of ``rows`` rows
    (``piece_step``): captured in a CUDA graph on CUDA and replayed each step (inputs copied into static
    buffers; the block-table rows gathered inside, as the decode graph does), run eagerly elsewhere. Padding rows
    point at the scratch slot with no real token."""

    def __init__(self, engine: Engine, rows: int):
        self.engine, self.rows = engine, rows
        device = engine.device
        pin = device.type == "cuda"
        # per row: slot, cached tokens, real tokens, then the PIECE_TOKENS token ids. Two host buffers alternate
        # (as the decode graph's do): the one being written was copied two steps ago, and the engine has waited
        # for the step before.
        self.hosts = [torch.empty((rows, 3 + PIECE_TOKENS), dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.padding = np.array([engine.scratch_slot, 0, 0] + [0] * PIECE_TOKENS, dtype=np.int64)
        for h in self.hosts:
            h.numpy()[:] = self.padding
        self.turn = 0
        self.inputs = self.hosts[0].to(device)
        self.graph = None
        if pin and engine.config.use_cuda_graph:
            self.capture()

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.engine
        slots, lengths, new_tokens = self.inputs[:, 0], self.inputs[:, 1], self.inputs[:, 2]
        table = e.block_tables.index_select(0, slots.clamp(max=e.block_tables.shape[0] - 1))
        view = e.pools.piece_view(slots, table, lengths.clone(), new_tokens)
        logits = piece_step(e.model, self.inputs[:, 3:], view)
        greedy = logits.argmax(-1)
        e.next_tokens.index_copy_(0, slots, greedy)
        return logits, greedy

    def capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # the scratch rows only: warm-up writes nothing a sequence reads
                self.run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.engine.piece_pool):  # one pool: their replays never overlap
            self.logits, self.greedy = self.run()

    def __call__(self, pieces) -> tuple[torch.Tensor, torch.Tensor]:
        """``pieces``: ``(sequence, start, end)`` each -> ``(logits [n, V] fp32, greedy [n])`` after each piece's
        last token, ``next_tokens`` set for their slots."""
        n = len(pieces)
        self.turn ^= 1
        host = self.hosts[self.turn]
        view = host.numpy()
        view[:] = self.padding
        for i, (seq, a, b) in enumerate(pieces):
            view[i, :3] = (seq.slot, a, b - a)
            view[i, 3 : 3 + b - a] = seq.tokens[a:b]
        self.inputs.copy_(host, non_blocking=self.graph is not None)
        if self.graph is None:
            logits, greedy = self.run()
        else:
            self.graph.replay()
            logits, greedy = self.logits, self.greedy
        return logits[:n], greedy[:n]


class Engine:
    """Continuous-batching engine over one model (see the module docstring).

    Args:
        model: a ``KimiLinearForCausalLM`` (eval mode), on its serving device and dtype.
        config: ``EngineConfig``.

    Raises:
        ValueError: a setting out of range or a memory budget that does not fit, naming the setting.
    """

    def __init__(self, model, config: EngineConfig = EngineConfig()):
        model.pack_for_inference()
        self.model = model
        self.config = config
        mc: KimiLinearConfig = model.config
        c = config
        for name in ("max_num_seqs", "max_model_len", "block_size", "max_num_batched_tokens", "max_queue"):
            v = getattr(c, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"EngineConfig.{name} must be an int >= 1, got {v!r}")
        if c.block_size % KDA_CHUNK:
            raise ValueError(f"EngineConfig.block_size must be a multiple of {KDA_CHUNK}, got {c.block_size}")
        if (not isinstance(c.snapshot_interval, int) or c.snapshot_interval <= 0
                or c.snapshot_interval % c.block_size):
            raise ValueError(f"EngineConfig.snapshot_interval must be a positive multiple of block_size="
                             f"{c.block_size}, got {c.snapshot_interval!r}")
        if c.max_model_len > mc.model_max_length:
            raise ValueError(
                f"EngineConfig.max_model_len={c.max_model_len} exceeds the model's "
                f"model_max_length={mc.model_max_length}"
            )
        if not 0 < c.gpu_memory_fraction <= 1:
            raise ValueError(f"EngineConfig.gpu_memory_fraction must be in (0, 1], got {c.gpu_memory_fraction}")
        if c.max_num_batched_tokens < c.max_num_seqs:
            raise ValueError(
                f"EngineConfig.max_num_batched_tokens={c.max_num_batched_tokens} must be >= max_num_seqs="
                f"{c.max_num_seqs} (one decode token per running sequence)"
            )
        self.device = model.device
        self.blocks_per_seq = math.ceil(c.max_model_len / c.block_size)
        num_snapshots = c.num_snapshots
        if num_snapshots is None:
            num_snapshots = 4 * c.max_num_seqs if c.enable_prefix_caching else 0
        if not isinstance(num_snapshots, int) or num_snapshots < 0:
            raise ValueError(f"EngineConfig.num_snapshots must be an int >= 0, got {num_snapshots!r}")
        self.num_seq_slots = c.max_num_seqs
        num_slots = c.max_num_seqs + num_snapshots + 1
        self.scratch_slot = num_slots - 1
        if c.kda_state_dtype not in STATE_DTYPES:
            raise ValueError(f"EngineConfig.kda_state_dtype must be torch.float32 or torch.bfloat16, got "
                             f"{c.kda_state_dtype!r}")
        dtype_bytes = torch.empty((), dtype=model.dtype).element_size()
        slot_bytes, token_bytes = cache_bytes(mc, dtype_bytes, c.kda_state_dtype.itemsize)
        block_bytes = token_bytes * c.block_size
        penalty_bytes = c.max_num_seqs * mc.vocab_size * 5  # per slot: token counts (int32) and prompt mask (bool)
        num_blocks = c.num_blocks
        if num_blocks is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = free * c.gpu_memory_fraction - slot_bytes * num_slots
                # room for the step's activations: a prefill of max_num_batched_tokens (a few copies of the
                # hidden states and the logits of the pieces' last tokens)
                budget -= 16 * c.max_num_batched_tokens * mc.hidden_size * dtype_bytes
                if c.use_cuda_graph:  # the padded-piece graphs' pool holds one such forward of their largest size
                    budget -= 16 * c.max_num_seqs * PIECE_TOKENS * mc.hidden_size * dtype_bytes
                budget -= penalty_bytes
                num_blocks = int(budget // block_bytes)
            else:
                num_blocks = c.max_num_seqs * self.blocks_per_seq
        if not isinstance(num_blocks, int) or num_blocks < self.blocks_per_seq:
            need = self.blocks_per_seq * block_bytes + slot_bytes * num_slots
            raise ValueError(
                f"the MLA block pool ({num_blocks} blocks of {c.block_size} tokens) cannot hold one sequence of "
                f"max_model_len={c.max_model_len} tokens ({self.blocks_per_seq} blocks); lower max_model_len or "
                f"max_num_seqs, or raise num_blocks / gpu_memory_fraction (one sequence needs "
                f"{need / 2**20:.1f} MiB with the slots)"
            )
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            need = slot_bytes * num_slots + block_bytes * (num_blocks + 1) + penalty_bytes
            if need > free * c.gpu_memory_fraction:
                raise ValueError(
                    f"the cache needs {need / 2**30:.2f} GiB (max_num_seqs={c.max_num_seqs}, num_blocks="
                    f"{num_blocks}, block_size={c.block_size}) but gpu_memory_fraction={c.gpu_memory_fraction} of "
                    f"the free {free / 2**30:.2f} GiB is less"
                )
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        self.pools = KimiLinearCache.pooled(
            mc, num_slots, num_blocks + 1, c.block_size, dtype=model.dtype, device=self.device,
            state_dtype=c.kda_state_dtype,
        )
        self.prefix = PrefixCache(num_blocks, c.block_size, range(c.max_num_seqs, c.max_num_seqs + num_snapshots))
        self.free_slots = list(range(c.max_num_seqs))[::-1]
        # The block table of each sequence slot, on the device: a step gathers its rows instead of building the
        # table on the host. Changes (blocks appended, slots freed) are queued and applied once per forward. The
        # last row stays all scratch: CUDA-graph padding rows read it.
        self.block_tables = torch.full((c.max_num_seqs + 1, self.blocks_per_seq), num_blocks, dtype=torch.long,
                                       device=self.device)
        self._table_writes: list[tuple[int, int, int]] = []  # (slot, column, block)
        self._table_clears: list[int] = []  # slots whose row goes back to the scratch block
        self._eos = () if mc.eos_token_id is None else (int(mc.eos_token_id),)
        # each slot's next input token, where the step that sampled it left it: a decode step reads its rows'
        # tokens here, so the host can launch it before it has read the tokens of the step before
        self.next_tokens = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        # per sequence slot, for the penalties: how often each token was generated, and the prompt's tokens
        self.token_counts = torch.zeros(c.max_num_seqs, mc.vocab_size, dtype=torch.int32, device=self.device)
        self.in_prompt = torch.zeros(c.max_num_seqs, mc.vocab_size, dtype=torch.bool, device=self.device)
        self._inflight: _Launched | None = None

        self._lock = threading.Lock()
        self._incoming: deque[_Sequence] = deque()
        self._aborts: set[str] = set()
        self._known: set[str] = set()  # ids waiting or running
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self._outstanding = 0  # blocks admitted sequences may still take (sum of reserve - held)
        self._stats = dict(queries=0, hits=0, generated=0, prompt=0, prefilled=0, finished=0, steps=0,
                           prefill_steps=0, step_seconds=0.0)

        self.graphs: dict[int, _DecodeGraph] = {}
        if c.use_cuda_graph and self.device.type == "cuda":
            try:
                for size in _bucket_sizes(c.max_num_seqs):
                    self.graphs[size] = _DecodeGraph(self, size)
            except Exception as e:  # noqa: BLE001 - a mixer that cannot be captured: decode eagerly
                warnings.warn(
                    f"CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); decoding eagerly",
                    stacklevel=2,
                )
                torch.cuda.synchronize()
                self.graphs = {}
        self.piece_runners: dict[int, _PieceRunner] = {}
        self.piece_pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        try:
            for size in _bucket_sizes(c.max_num_seqs):
                self.piece_runners[size] = _PieceRunner(self, size)
        except Exception as e:  # noqa: BLE001 - a mixer that cannot be captured: small pieces run as the others
            warnings.warn(f"capture of the padded-piece step failed ({type(e).__name__}: {e}); every prefill "
                          "piece runs packed", stacklevel=2)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.piece_runners = {}

    @property
    def model_config(self) -> KimiLinearConfig:
        return self.model.config

    # ---- public, thread-safe -----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request. Thread-safe.

        Raises:
            ValueError: empty prompt, ids outside the vocabulary, prompt + max_tokens > max_model_len, bad
                sampling values, or a duplicate id.
            QueueFullError: ``max_queue`` requests are waiting.
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        vocab = self.model.config.vocab_size
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("the prompt is empty; a request needs at least one token")
        kinds = set(map(type, prompt))  # {int} almost always: then two C loops check the range
        if kinds != {int} and not all(issubclass(k, int) and not issubclass(k, bool) for k in kinds):
            raise ValueError(f"the prompt's token ids must be ints, got {sorted(k.__name__ for k in kinds)}")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"the prompt holds token ids outside [0, vocab_size={vocab})")
        if len(prompt) + params.max_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len="
                f"{self.config.max_model_len}"
            )
        if not all(0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, vocab_size={vocab})")
        if any(t >= vocab for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, vocab_size={vocab})")
        rng = None
        if params.temperature > 0:
            rng = random.Random(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self._eos))
        seq = _Sequence(request_id, prompt, params, stop, rng, time.monotonic(), tokens=list(prompt))
        with self._lock:
            if request_id in self._known:
                raise ValueError(f"request id {request_id!r} is already in use")
            if len(self._incoming) + len(self.waiting) >= self.config.max_queue:
                raise QueueFullError(f"{self.config.max_queue} requests are already waiting (max_queue)")
            self._known.add(request_id)
            self._incoming.append(seq)

    def abort(self, request_id: str) -> None:
        """Finish a request with "abort" at the next step, freeing its slot and blocks. Thread-safe; unknown
        ids are ignored."""
        with self._lock:
            if request_id in self._known:
                self._aborts.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._incoming or self.waiting or self.running or self._aborts or self._inflight)

    def stats(self) -> EngineStats:
        with self._lock:
            s = self._stats
            return EngineStats(
                waiting=len(self.waiting) + len(self._incoming),
                running=len(self.running),
                num_slots=self.num_seq_slots,
                free_slots=len(self.free_slots),
                num_blocks=self.num_blocks,
                free_blocks=self.prefix.num_free_blocks(),
                prefix_cache_queries=s["queries"],
                prefix_cache_hits=s["hits"],
                generated_tokens_total=s["generated"],
                prompt_tokens_total=s["prompt"],
                prefill_tokens_total=s["prefilled"],
                finished_requests_total=s["finished"],
                steps_total=s["steps"],
                prefill_steps_total=s["prefill_steps"],
                step_seconds_total=s["step_seconds"],
            )

    # ---- the step ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One iteration (one thread only): admit; launch one decode step for the running sequences and the
        prefill pieces within the token budget; then read the tokens the previous iteration launched, emit
        them and retire the finished. The GPU runs this iteration's forward while the host reads and emits the
        previous one's tokens (a decode step takes its input tokens from ``next_tokens`` on the device), so
        events come one iteration after their forward. A failure inside a request finishes it with "error"."""
        start = time.perf_counter()
        events: list[TokenEvent] = []
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            aborts, self._aborts = self._aborts, set()
        for seq in [s for s in self.waiting if s.request_id in aborts]:
            self.waiting.remove(seq)
            self._finish(seq, "abort", events)
        for seq in [s for s in self.running if s.request_id in aborts]:
            self._finish(seq, "abort", events)
        self._admit(events)

        # a sequence whose in-flight token may be its last is not stepped on
        decoding = [s for s in self.running
                    if not s.prefilling and s.completion + s.pending < s.params.max_tokens]
        budget = self.config.max_num_batched_tokens - len(decoding)
        pieces = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.prefilling:
                end = self._piece_end(seq, budget)
                pieces.append((seq, seq.computed, end))
                budget -= end - seq.computed
        launched = _Launched()
        if decoding:
            self._guarded(decoding, lambda: self._decode(decoding, launched, events), events)
        if pieces:
            self._guarded([p[0] for p in pieces], lambda: self._prefill(pieces, launched, events), events)
        if launched.rows and self.device.type == "cuda":
            launched.event = torch.cuda.Event()
            launched.event.record()
        previous, self._inflight = self._inflight, (launched if launched.rows else None)
        if previous is not None:
            self._resolve(previous, events)
        self._register([s for s in decoding + [p[0] for p in pieces] if not s.done])
        if decoding or pieces:
            self._stats["steps"] += 1
            self._stats["prefill_steps"] += bool(pieces)
            self._stats["step_seconds"] += time.perf_counter() - start
        return events

    def _guarded(self, seqs, run, events) -> None:
        """Run a batched forward; if it raises, finish every request in it with "error" (their slots may hold
        partial updates) and keep going."""
        try:
            run()
        except Exception as e:  # noqa: BLE001 - one failing batch must not stop the engine
            message = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            for seq in seqs:
                if seq in self.running:
                    self._finish(seq, "error", events, error=message)

    def _admit(self, events) -> None:
        c = self.config
        restores = []
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            reserve = math.ceil((len(seq.prompt) + seq.params.max_tokens) / c.block_size)
            hit_blocks, snapshot, node, matched = [], None, 0, 0
            if c.enable_prefix_caching and seq.params.prompt_logprobs is None:
                hit_blocks, snapshot, node, matched = self.prefix.lookup(seq.prompt)
            # blocks that only the prefix cache held become this sequence's: count them as taken
            self.prefix.acquire(hit_blocks)
            if self.prefix.num_available_blocks() - self._outstanding < reserve - len(hit_blocks):
                self.prefix.release(hit_blocks)
                break  # not enough memory for its worst case yet: wait for running sequences to finish
            self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            seq.blocks = list(hit_blocks)
            self._table_writes += [(seq.slot, j, b) for j, b in enumerate(hit_blocks)]
            seq.reserve = reserve
            self._outstanding += reserve - len(hit_blocks)
            seq.computed = seq.cached_tokens = len(hit_blocks) * c.block_size
            seq.node, seq.registered = node, len(hit_blocks)
            seq.branch = matched * c.block_size
            restores.append((snapshot, seq.slot))
            self.running.append(seq)
            if seq.params.penalized:
                self.token_counts[seq.slot].zero_()
                self.in_prompt[seq.slot].zero_()
                self.in_prompt[seq.slot].index_fill_(0, self._to_device(sorted(set(seq.prompt))), True)
                if seq.params.logit_bias:  # on the device once: a step adds it with one indexed add per row
                    ids, values = zip(*seq.params.logit_bias, strict=True)
                    seq.bias = (self._to_device(list(ids)), self._to_device(list(values), dtype=torch.float32))
            self._stats["prompt"] += len(seq.prompt)
            if c.enable_prefix_caching:
                self._stats["queries"] += len(seq.prompt)
                self._stats["hits"] += seq.cached_tokens
        if restores:
            fresh = [d for s, d in restores if s is None]
            if fresh:  # every layer's conv tails and states of every fresh slot: one op per slot group
                rows = self._to_device(fresh)
                for group in self.pools.slot_groups:  # [layers, num_slots, ...]
                    group.index_fill_(1, rows, 0)
            hits = [(s, d) for s, d in restores if s is not None]
            if hits:
                self._copy_slots([s for s, _ in hits], [d for _, d in hits])

    def _copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy the KDA states and conv tails of slots ``src`` to slots ``dst`` (disjoint sets: snapshots and
        sequence slots) in every layer: a gather and a scatter per slot group."""
        src_rows, dst_rows = self._to_device(src), self._to_device(dst)
        for group in self.pools.slot_groups:  # [layers, num_slots, ...]
            group.index_copy_(1, dst_rows, group.index_select(1, src_rows))

    def _piece_end(self, seq: _Sequence, budget: int) -> int:
        """End of the next prefill piece: within the budget, on a block boundary unless it ends the prompt.
        With prefix caching two boundaries also end a piece, so their states are snapshotted: where the
        prefix cache's blocks for this prompt end (the branch point from an earlier prompt) and the prompt's
        last full block boundary."""
        bs, P, start = self.config.block_size, len(seq.prompt), seq.computed
        end = min(P, start + budget)
        if end < P and (end // bs) * bs > start:
            end = (end // bs) * bs
        if self.config.enable_prefix_caching:
            for cut in (seq.branch, (P // bs) * bs):
                if start < cut < end:
                    end = cut
        return end

    def _ensure_blocks(self, seq: _Sequence, length: int) -> None:
        need = math.ceil(length / self.config.block_size) - len(seq.blocks)
        if need > 0:
            first = len(seq.blocks)
            new = self.prefix.allocate(need)
            seq.blocks.extend(new)
            self._table_writes += [(seq.slot, first + j, b) for j, b in enumerate(new)]
            self._outstanding -= need

    def _apply_table_changes(self) -> None:
        if self._table_clears:
            # index_fill_ takes the value as a number; indexed assignment copied it from pageable host memory,
            # a copy that waits for the GPU (the one sync CUDA's sync-debug mode found in a prefill step)
            self.block_tables.index_fill_(0, self._to_device(self._table_clears), self.scratch_block)
            self._table_clears = []
        if self._table_writes:
            slot, col, block = self._to_device(self._table_writes).unbind(1)
            self.block_tables[slot, col] = block
            self._table_writes = []

    def _to_device(self, values, dtype=torch.long) -> torch.Tensor:
        """A host list as a tensor on the engine's device, through pinned memory on CUDA: the copy does not
        wait for the GPU to finish what it is running."""
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=dtype)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)

    def _rows(self, seqs) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequences' slots ``[n]`` and block-table rows ``[n, blocks_per_seq]`` on the device, after the
        queued table changes."""
        self._apply_table_changes()
        slots = self._to_device([s.slot for s in seqs])
        return slots, self.block_tables.index_select(0, slots)

    def decode_rows(self, slots: torch.Tensor, lengths: torch.Tensor, host_lengths: list[int] | None = None):
        """One decode step for the rows at state slots ``slots [n]`` whose caches hold ``lengths [n]`` tokens
        (advanced by one): each row's input token is ``next_tokens[slot]``. Returns ``(logits [n, V] fp32,
        argmax [n])`` and leaves the argmax in ``next_tokens``. No host sync: what the CUDA graphs capture.
        Slots past the sequence slots (the scratch slot) read the last block-table row, which is all scratch."""
        rows = slots.clamp(max=self.block_tables.shape[0] - 1)
        view = self.pools.view(slots, self.block_tables.index_select(0, rows), lengths)
        if host_lengths is not None:
            view.set_host_lengths(host_lengths)
        logits = decode_step(self.model, self.next_tokens.index_select(0, slots), view)
        greedy = logits.argmax(-1)
        self.next_tokens.index_copy_(0, slots, greedy)
        return logits, greedy

    def _decode(self, seqs: list[_Sequence], launched: _Launched, events) -> None:
        for s in seqs:
            self._ensure_blocks(s, s.computed + 1)
        slots = [s.slot for s in seqs]
        lengths = [s.computed for s in seqs]
        graph = next((self.graphs[b] for b in sorted(self.graphs) if b >= len(seqs)), None)
        self._apply_table_changes()
        if graph is not None:
            logits, greedy = graph(slots, lengths)
        else:
            logits, greedy = self.decode_rows(self._to_device(slots), self._to_device(lengths), lengths)
        for s in seqs:
            s.computed += 1
        self._choose(seqs, slots, logits, greedy, launched, events)

    def _prefill(self, pieces, launched: _Launched, events) -> None:
        seqs = [p[0] for p in pieces]
        for seq, _, end in pieces:
            self._ensure_blocks(seq, end)
        runner = next((self.piece_runners[b] for b in sorted(self.piece_runners) if b >= len(pieces)), None)
        if runner is not None and all(b - a <= PIECE_TOKENS and s.params.prompt_logprobs is None
                                      for s, a, b in pieces):
            self._apply_table_changes()
            logits, greedy = runner(pieces)
            done = self._advance(pieces)
            if done:
                rows = self._to_device(done)
                self._choose([seqs[i] for i in done], [seqs[i].slot for i in done], logits.index_select(0, rows),
                             greedy.index_select(0, rows), launched, events)
            return
        ids = [t for seq, a, b in pieces for t in seq.tokens[a:b]]
        lens = [b - a for _, a, b in pieces]
        cu_host = [0]
        for n in lens:
            cu_host.append(cu_host[-1] + n)
        ids_t = self._to_device(ids)[None]
        remember_host_values(ids_t, ids)  # the model checks the ids on the host (done at add_request already)
        cu = self._to_device(cu_host)
        remember_host_values(cu, cu_host)  # the ops read the boundaries on the host: no read-back
        starts = [a for _, a, _ in pieces]
        slots, table = self._rows(seqs)
        points = self._snapshot_points(pieces)
        try:
            snapshots = self._state_snapshots(points, lens, cu_host) if points else None
            view = self.pools.view(slots, table, self._to_device(starts), snapshots=snapshots)
            view.set_host_lengths(starts)
            hidden = self.model.hidden_states(ids_t, cache=view, cu_seqlens=cu)  # [1, T, D]
        except BaseException:
            for _, _, slot in points:
                self.prefix.free_snapshot(slot)
            raise
        done = self._advance(pieces)
        if points:  # the snapshots' nodes exist once the pieces' blocks are registered
            nodes = {i: self._insert_blocks(pieces[i][0]) for i in {i for i, _, _ in points}}
            for i, offset, slot in points:
                node = nodes[i].get(pieces[i][1] + offset)
                if node is None:
                    self.prefix.free_snapshot(slot)
                else:
                    self.prefix.attach_snapshot(node, slot)
        for i, (seq, a, b) in enumerate(pieces):
            if seq.params.prompt_logprobs is not None:
                seq.prompt_scores.append(self._prompt_logprobs(seq, hidden[0, cu_host[i] : cu_host[i + 1]], a, b))
        if done:
            last = self._to_device([cu_host[i + 1] - 1 for i in done])
            logits = self.model.lm_head(hidden[0, last]).float()
            greedy = logits.argmax(-1)
            done_slots = [seqs[i].slot for i in done]
            self.next_tokens.index_copy_(0, self._to_device(done_slots), greedy)
            self._choose([seqs[i] for i in done], done_slots, logits, greedy, launched, events)

    def _advance(self, pieces) -> list[int]:
        """The pieces' tokens are in the cache: move each sequence past its piece; the indices of the pieces that
        ended their prompt (whose last logits give the first token)."""
        for seq, a, b in pieces:
            seq.computed = b
            self._stats["prefilled"] += b - a
        return [i for i, (seq, _, end) in enumerate(pieces) if end == len(seq.prompt)]

    def _snapshot_points(self, pieces) -> list[tuple[int, int, int]]:
        """The points inside the pieces where the forward snapshots the KDA states (prompt positions that are
        multiples of ``snapshot_interval``, strictly inside a piece: its end is snapshotted by ``_register``),
        as (piece, tokens into it, reserved snapshot slot); as many as there are slots to take."""
        if not self.config.enable_prefix_caching:
            return []
        every = self.config.snapshot_interval
        points = []
        for i, (_, a, b) in enumerate(pieces):
            for p in range((a // every + 1) * every, b, every):
                slot = self.prefix.reserve_snapshot()
                if slot is None:
                    return points
                points.append((i, p - a, slot))
        return points

    def _state_snapshots(self, points, lens: list[int], cu_host: list[int]) -> StateSnapshots:
        """``points`` as the forward's ``StateSnapshots``: the chunk each starts (the pieces' chunks counted in
        order, ``KDA_CHUNK`` tokens each) and its position in the packed forward."""
        first_chunk = [0]
        for n in lens:
            first_chunk.append(first_chunk[-1] + -(-n // KDA_CHUNK))
        return StateSnapshots(
            chunks=self._to_device([first_chunk[i] + offset // KDA_CHUNK for i, offset, _ in points]),
            tokens=self._to_device([cu_host[i] + offset for i, offset, _ in points]),
            slots=self._to_device([slot for _, _, slot in points]),
        )

    def _prompt_logprobs(self, seq: _Sequence, hidden: torch.Tensor, a: int, b: int) -> tuple:
        """Log probabilities of prompt tokens a + 1 .. min(b, P - 1) from the hidden states ``[b - a, D]`` of
        positions a .. b - 1 (the last prompt position predicts the first generated token: not a prompt
        token's), ``PROMPT_LOGPROBS_ROWS`` at a time: host copies of (chosen [n], top values [n, k], top ids)."""
        n = min(b, len(seq.prompt) - 1) - a
        targets = self._to_device(seq.prompt[a + 1 : a + 1 + n])
        k = seq.params.prompt_logprobs
        parts = []
        for r in range(0, n, PROMPT_LOGPROBS_ROWS):
            rows = hidden[r : min(r + PROMPT_LOGPROBS_ROWS, n)]
            lp = torch.log_softmax(self.model.lm_head(rows).float(), dim=-1)
            values, ids = lp.topk(k, dim=-1)
            parts.append((lp.gather(1, targets[r : r + PROMPT_LOGPROBS_ROWS, None])[:, 0], values, ids))
        if not parts:
            return ()
        return tuple(self._to_host(torch.cat(x)) for x in zip(*parts, strict=True))

    def _prompt_scores(self, seq: _Sequence) -> tuple | None:
        """The prompt logprobs ``_prompt_logprobs`` gathered for ``seq``, as ``TokenEvent.prompt_logprobs``."""
        if seq.params.prompt_logprobs is None:
            return None
        out = []
        for piece in seq.prompt_scores:
            if piece:
                chosen, values, ids = (x.tolist() for x in piece)
                out += [(lp, tuple(zip(i, v, strict=True))) for lp, v, i in zip(chosen, values, ids, strict=True)]
        seq.prompt_scores = []
        return tuple(out)

    def _register(self, seqs) -> None:
        """Put the sequences' newly filled blocks in the prefix cache; snapshot the KDA slot of each that
        stands on a block boundary. In its generated tokens a sequence keeps one snapshot, at the last boundary
        it crossed (its slot moves along): enough for the next turn of a conversation, which extends the whole
        completion, without one snapshot per block of every long completion pushing the prompts' snapshots out
        of the least-recently-used pool."""
        if not self.config.enable_prefix_caching:
            return
        bs = self.config.block_size
        src, dst = [], []
        for seq in seqs:
            self._insert_blocks(seq)
            if seq.computed % bs == 0 and seq.node != 0 and not self.prefix.has_snapshot(seq.node):
                generated = seq.computed > len(seq.prompt)
                snap = self.prefix.detach_snapshot(seq.decode_node) if generated and seq.decode_node else None
                if snap is None:
                    snap = self.prefix.reserve_snapshot()
                if snap is not None and self.prefix.attach_snapshot(seq.node, snap):
                    src.append(seq.slot)
                    dst.append(snap)
                    if generated:
                        seq.decode_node = seq.node
        if src:
            self._copy_slots(src, dst)

    def _insert_blocks(self, seq: _Sequence) -> dict[int, int]:
        """Register the sequence's full blocks not registered yet; returns {prompt position at the block's end:
        its node} for those."""
        bs = self.config.block_size
        nodes = {}
        while seq.registered < seq.computed // bs:
            j = seq.registered
            seq.node = self.prefix.insert(seq.node, seq.tokens[j * bs : (j + 1) * bs], seq.blocks[j])
            seq.registered += 1
            nodes[(j + 1) * bs] = seq.node
        return nodes

    def _choose(self, seqs, slots: list[int], logits: torch.Tensor, greedy: torch.Tensor, launched: _Launched,
                events) -> None:
        """Pick each row's next token on the device from ``logits [n, V]`` (``greedy [n]``: their argmax, which
        the caller has put in ``next_tokens``), leave it in ``next_tokens`` for the next decode step and queue its
        copy to the host in ``launched``. Rows with penalties are penalised first (``_penalized``) and count the
        token they get. All rows are sampled in one batch (``sample_rows``, one uniform draw from each sampling request's own generator)
        unless every request is greedy. If the batch fails, the rows are sampled one at a time, and a request
        whose own sampling fails is finished with "error" at once."""
        model_logits = logits  # what log probabilities are taken from
        penalized = [i for i, s in enumerate(seqs) if s.params.penalized]
        if penalized:
            logits, greedy = self._penalized(seqs, slots, logits, penalized)
        chosen = greedy
        sampled = not all(s.params.temperature == 0 for s in seqs)
        if sampled:
            draws = [s.rng.random() if s.rng is not None else 0.0 for s in seqs]

            def rows(idx):
                p = [seqs[i].params for i in idx]
                rows_logits = logits if len(idx) == len(seqs) else logits[idx]
                return sample_rows(rows_logits, [q.temperature for q in p], [q.top_k for q in p],
                                   [q.top_p for q in p], [draws[i] for i in idx])

            try:
                chosen = rows(list(range(len(seqs))))
            except Exception:  # noqa: BLE001 - find the requests whose sampling fails; the others go on
                parts = []
                for i, seq in enumerate(seqs):
                    try:
                        parts.append(rows([i]))
                    except Exception as e:  # noqa: BLE001 - finishes this request only
                        parts.append(greedy[i : i + 1])
                        self._finish(seq, "error", events, error=f"{type(e).__name__}: {e}")
                chosen = torch.cat(parts)
        if penalized or sampled:  # else the forward's argmax is in next_tokens already
            self.next_tokens.index_copy_(0, self._to_device(slots), chosen)
        if penalized:
            counted = self._to_device([[i, slots[i]] for i in penalized])  # (row, its slot)
            self.token_counts.index_put_((counted[:, 1], chosen.index_select(0, counted[:, 0])),
                                         torch.ones(len(penalized), dtype=torch.int32, device=self.device),
                                         accumulate=True)
        launched.rows.append((seqs, self._to_host(chosen), self._logprobs(seqs, model_logits, chosen)))
        for seq in seqs:
            seq.pending += 1

    def _penalized(self, seqs, slots: list[int], logits: torch.Tensor, rows: list[int]):
        """``(logits, argmax)`` with the penalties of ``seqs[i]`` for i in ``rows`` applied (a new tensor: the
        decode graph's output buffer is left as it is)."""
        params = [seqs[i].params for i in rows]
        values = self._to_device([[p.repetition_penalty for p in params], [p.frequency_penalty for p in params],
                                  [p.presence_penalty for p in params]], dtype=torch.float32)
        index = self._to_device(rows)
        row_slots = self._to_device([slots[i] for i in rows])
        out = logits.float().clone()
        penalised = apply_penalties(out.index_select(0, index), self.token_counts.index_select(0, row_slots),
                                    self.in_prompt.index_select(0, row_slots), *values.unbind(0))
        out.index_copy_(0, index, penalised)
        for i in rows:
            if seqs[i].bias is not None:
                out[i].index_add_(0, *seqs[i].bias)
        return out, out.argmax(-1)

    def _to_host(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` in host memory that is complete once the iteration's event has passed (pinned and
        not waited for on CUDA)."""
        if self.device.type != "cuda":
            return x.clone()
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return host.copy_(x, non_blocking=True)

    def _logprobs(self, seqs, logits: torch.Tensor, chosen: torch.Tensor) -> tuple | None:
        """The log probabilities the rows of ``seqs`` asked for (see the module docstring), on their way to the
        host: ``(rows, chosen [m], top values [m, k], top ids [m, k])`` with k the largest request's, or None."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not rows:
            return None
        idx = self._to_device(rows) if len(rows) < len(seqs) else None
        lp = torch.log_softmax((logits if idx is None else logits.index_select(0, idx)).float(), dim=-1)
        picked = chosen if idx is None else chosen.index_select(0, idx)
        k = max(seqs[i].params.logprobs for i in rows)
        top_values, top_ids = lp.topk(k, dim=-1)  # [m, k], most likely first
        return (rows, self._to_host(lp.gather(1, picked[:, None])[:, 0]), self._to_host(top_values),
                self._to_host(top_ids))

    def _resolve(self, launched: _Launched, events) -> None:
        """Wait for a launched iteration, then take each row's token: emit it, or finish the request on a stop
        token or at max_tokens. Rows of requests finished since their launch are dropped."""
        if launched.event is not None:
            launched.event.synchronize()
        for seqs, host, logprobs in launched.rows:
            scores = dict.fromkeys(range(len(seqs)), (None, None))
            if logprobs is not None:
                rows, chosen, top_values, top_ids = (x if isinstance(x, list) else x.tolist() for x in logprobs)
                for i, lp, values, ids in zip(rows, chosen, top_values, top_ids, strict=True):
                    k = seqs[i].params.logprobs
                    scores[i] = (lp, tuple(zip(ids[:k], values[:k], strict=True)))
            for i, (seq, token) in enumerate(zip(seqs, host.tolist(), strict=True)):
                if seq.done:
                    continue
                seq.pending -= 1
                seq.tokens.append(token)
                self._stats["generated"] += 1
                reason = ("stop" if token in seq.stop
                          else "length" if seq.completion >= seq.params.max_tokens else None)
                lp, top = scores[i]
                prompt = self._prompt_scores(seq) if seq.completion == 1 else None
                if reason is None:
                    events.append(TokenEvent(seq.request_id, token, False, None, logprob=lp, top_logprobs=top,
                                             prompt_logprobs=prompt))
                else:
                    self._finish(seq, reason, events, token=token, logprob=lp, top_logprobs=top,
                                 prompt_logprobs=prompt)

    def _finish(self, seq: _Sequence, reason: str, events, token: int | None = None, error: str | None = None,
                logprob: float | None = None, top_logprobs: tuple | None = None, prompt_logprobs: tuple | None = None):
        seq.done = True
        if seq in self.running:
            self.running.remove(seq)
            if reason in ("stop", "length"):
                self._register([seq])
            self.prefix.release(seq.blocks)
            self._outstanding -= seq.reserve - len(seq.blocks)
            self.free_slots.append(seq.slot)
            self._table_writes = [w for w in self._table_writes if w[0] != seq.slot]
            self._table_clears.append(seq.slot)
            seq.blocks, seq.slot = [], -1
        with self._lock:
            self._known.discard(seq.request_id)
        self._stats["finished"] += 1
        events.append(
            TokenEvent(
                seq.request_id, token, True, reason, prompt_tokens=len(seq.prompt),
                completion_tokens=seq.completion, cached_tokens=seq.cached_tokens, error=error, logprob=logprob,
                top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
            )
        )
