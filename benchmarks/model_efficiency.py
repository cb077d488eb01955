"""Prefill, TPOT, memory-filling batch and cache of Kimi Linear vs MLA-only vs GDN hybrid (paper Fig. 1, 7).

Three models of the same width and depth, random weights, bf16, built from one config that differs only in
``mixer``: Kimi Linear (3 KDA:1 MLA), MLA-only (``mixer="mla"``) and the GDN hybrid (``mixer="gdn"``, 3 GDN:1
MLA). Widths are the released 48B-A3B's attention shapes (hidden 2304, 32 heads, KDA 32x128, MLA kv_lora 512 +
rope 64, vocab 163840) with 4 layers (one 3:1 group, the release's first four layer types) and a dense SwiGLU
MLP of 9216 — the same active width as the release's MoE (8 routed + 1 shared experts of 1024). Four layers
keep the 1M-token MLA-only prefill inside the run's time limit; a deeper stack scales every layer term by the
same factor and only dilutes the shared embedding/head cost, so the ratios here are, if anything,
conservative.

Measured:

* prefill latency at each context, batch 1. The prefill runs **layer-major**: each layer processes the whole
  sequence before the next one starts. MLA layers take the whole sequence in one pass (fused causal attention;
  no chunking: a chunk of queries against a long cached prefix would need an explicit mask); KDA/GDN layers
  take it in pieces of ``--piece`` tokens whose conv tails and recurrent state carry through the cache (the
  torch short-conv works in fp32 and would not fit at 1M in one pass). Computation and cache contents are
  exactly those of ``model.hidden_states(ids, cache)`` (tests check it); at short contexts the one-pass model
  forward is timed too.
* TPOT at batch 1 at each context: ``generate.decode_step`` captured in a CUDA graph (one replay per token, as
  ``generate.CudaGraphDecoder``; the warm-up's memory is freed before the capture). The caches are filled
  synthetically (random latents, states and conv tails, ``lengths`` = context) instead of prefilled: a decode
  step's cost depends only on the cache length, not on how the values got there.
* TPOT at the largest batch each model fits at the batch contexts (the Fig. 1 regime): batch size from the
  free memory over (cache + decode workspace) per sequence, both measured from allocations at batch 1 and 2.
  Reported as the step time and the time per output token (step / batch; its inverse is the throughput).
* cache bytes per sequence: allocator delta of ``allocate_cache(1, context)`` vs ``cache_bytes_per_sequence``
  (the formula ``kimi-linear info`` prints).
* per-layer breakdowns: prefill by CUDA events around each layer's mixer (and inside it, the KDA chunk kernel
  or the MLA attention call) and MLP; decode by one CUDA graph per layer part, plus the eager step (launch
  overhead).

    python -m benchmarks model_efficiency --budget-s 240                    # the GPU run (~5 minutes)
    python -m benchmarks model_efficiency --smoke --out DIR                 # tiny config on CPU, seconds
    python -m benchmarks model_efficiency --plot-only benchmarks/results/model_efficiency.json --markdown

Writes ``model_efficiency.json`` after every measurement (a timeout keeps what was done), then the plots
``model_efficiency.png`` (Fig. 7 style) and ``model_efficiency_speedup.png`` (Fig. 1 style); prints the table
last. Times are medians of CUDA-event timings after warm-up (prefill: 3 runs up to 32k, 2 up to 256k, then one
run of seconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import (
    H200_BF16_TFLOPS,
    H200_HBM_TBPS,
    SuiteParser,
    capture_graph,
    environment,
    median_ms,
    pyplot,
    write_json,
)
from kimi_linear.cache import LINEAR_TYPES, cache_bytes_per_sequence
from kimi_linear.config import KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM

MODELS = {"kimi_linear": "kda", "mla_only": "mla", "gdn_hybrid": "gdn"}  # name -> config mixer
LABELS = {
    "kimi_linear": "Kimi Linear (3:1 KDA:MLA)",
    "mla_only": "MLA only",
    "gdn_hybrid": "GDN-H (3:1 GDN:MLA)",
}
CONTEXTS = (4096, 32768, 131072, 262144, 524288, 1048576)
BATCH_CONTEXTS = (131072, 524288, 1048576)
SMOKE_CONTEXTS = (64, 160, 320)
SMOKE_BATCH_CONTEXTS = (160, 320)
HBM_BYTES_PER_S = H200_HBM_TBPS * 1e12
BF16_FLOP_PER_S = H200_BF16_TFLOPS * 1e12
GIB = 1 << 30


# ---- models ------------------------------------------------------------------------------------------------


def make_config(
    name: str, smoke: bool = False, layers: int = 4, max_context: int = 1 << 20
) -> KimiLinearConfig:
    """The config of model ``name`` (a key of MODELS): 48B-A3B attention shapes, ``layers`` layers, dense MLP.

    ``smoke`` gives a tiny config with the same layout (CPU-sized) instead.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; models are {list(MODELS)}")
    common = dict(
        num_hidden_layers=layers,
        first_k_dense_replace=layers,
        mixer=MODELS[name],
        hybrid_ratio=3,
        model_max_length=max_context + 4096,
    )
    if smoke:
        return KimiLinearConfig(
            vocab_size=512,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=128,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            kda_num_heads=2,
            kda_head_dim=32,
            num_experts=8,
            num_experts_per_token=2,
            moe_intermediate_size=32,
            dtype="float32",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
            **common,
        )
    return KimiLinearConfig(intermediate_size=9216, **common)


def make_model(config: KimiLinearConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    with torch.device(device):
        model = KimiLinearForCausalLM(config)
    return model.to(dtype).eval()


def weight_bytes_per_step(model) -> int:
    """Parameter bytes one decode step reads: everything except the embedding table (one row is read)."""
    embed = model.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


# ---- timing ------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Spans:
    """Named time spans on one device (CUDA events, or the host clock on CPU); ``totals()`` sums per name."""

    def __init__(self, device: torch.device):
        self.device = device
        self.done: list[tuple[str, object, object]] = []

    def _now(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def span(self, name: str):
        start = self._now()
        try:
            yield
        finally:
            self.done.append((name, start, self._now()))

    def totals(self) -> dict[str, float]:
        """Milliseconds per name (synchronises the device)."""
        sync(self.device)
        out: dict[str, float] = {}
        for name, start, end in self.done:
            ms = start.elapsed_time(end) if self.device.type == "cuda" else (end - start) * 1e3
            out[name] = out.get(name, 0.0) + ms
        return out


@contextlib.contextmanager
def instrumented(spans: Spans):
    """Time the linear-attention chunk kernel and the MLA attention call inside the layers (patched in)."""
    import kimi_linear.layers.kda as kda_layer
    from kimi_linear.layers.mla import MultiheadLatentAttention

    chunk_kda, attend = kda_layer.chunk_kda, MultiheadLatentAttention._attend

    def timed_chunk_kda(*args, **kwargs):
        with spans.span("linear_kernel"):
            return chunk_kda(*args, **kwargs)

    def timed_attend(self, *args, **kwargs):
        with spans.span("mla_attention"):
            return attend(self, *args, **kwargs)

    kda_layer.chunk_kda, MultiheadLatentAttention._attend = timed_chunk_kda, timed_attend
    try:
        yield
    finally:
        kda_layer.chunk_kda, MultiheadLatentAttention._attend = chunk_kda, attend


def graph_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph (plain calls on CPU)."""
    cuda = device.type == "cuda"
    return median_ms(capture_graph(fn) if cuda else fn, reps, warmup=2 if cuda else 1, cuda=cuda)


# ---- prefill -----------------------------------------------------------------------------------------------


@torch.no_grad()
def prefill_layer_major(
    model, ids: torch.Tensor, cache, piece: int, spans: Spans | None = None
) -> torch.Tensor:
    """Prefill ``ids [1, T]`` into an empty ``cache`` layer by layer; returns the last token's logits [1, V].

    The block is ``DecoderLayer.forward`` (mixer, MLP, pre-norm residuals) applied to the whole sequence for
    MLA layers and to consecutive pieces of ``piece`` tokens for KDA/GDN layers (state and conv tails carry
    through the cache; ``cache.lengths`` says how many tokens the layer already holds). Same results and cache
    contents as ``model.hidden_states(ids, cache)``; ``cache.lengths`` ends at T.
    """
    spans = spans or Spans(ids.device)
    T = ids.shape[1]
    with spans.span("embed"):
        x = model.model.embed_tokens(ids)  # [1, T, D]
    for layer in model.model.layers:
        kind = layer.layer_type
        bounds = [(0, T)] if kind == "mla" else [(a, min(a + piece, T)) for a in range(0, T, piece)]
        ffn = layer.block_sparse_moe if layer.is_moe else layer.mlp
        for a, b in bounds:
            cache.lengths.fill_(a)  # what this layer holds already: the mixers read their history from it
            h = x[:, a:b]
            with spans.span(f"{kind}_mixer"):
                h = h + layer.self_attn(layer.input_layernorm(h), cache=cache)
            with spans.span("mlp"):
                h = h + ffn(layer.post_attention_layernorm(h))
            if len(bounds) == 1:
                x = h
            else:
                x[:, a:b] = h  # piece a:b is this layer's input only: overwriting it feeds no later piece
    with spans.span("head"):
        logits = model.lm_head(model.model.norm(x[:, -1])).float()  # [1, V]
    cache.lengths.fill_(T)
    return logits


def prefill_flops(config: KimiLinearConfig, model, T: int) -> float:
    """FLOPs of a batch-1 prefill of T tokens: 2 per weight per token (embedding excluded, head on one token),
    causal MLA attention T²/2 pairs × 2 × (dqk + dv) per head, linear layers by the paper's Eq. 13, C = 64."""
    embed, head = model.model.embed_tokens.weight.numel(), model.lm_head.weight.numel()
    dense = sum(p.numel() for p in model.parameters()) - embed - head
    flops = 2.0 * dense * T + 2.0 * head
    H, K, C = config.kda_num_heads, config.kda_head_dim, 64
    for kind in config.layer_types:
        if kind == "mla":
            flops += float(T) * T * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
        else:
            flops += H * (6.0 * T * K * K + 3.0 * T * C * K + T * C * C)
    return flops


def time_prefill(model, T: int, piece: int, reps: int, one_pass: bool) -> dict:
    """Median prefill ms (layer-major) and breakdown; ``one_pass`` also times the model's one-pass forward."""
    device = model.device
    ids = torch.randint(0, model.config.vocab_size, (1, T), device=device)
    runs = []
    for _ in range(reps):
        cache = model.allocate_cache(1, T)
        spans = Spans(device)
        with instrumented(spans), spans.span("total"):
            prefill_layer_major(model, ids, cache, piece, spans)
        runs.append(spans.totals())
        del cache
    run = sorted(runs, key=lambda r: r["total"])[len(runs) // 2]
    out = dict(ms=run["total"], reps=reps, breakdown=breakdown_prefill(run, model.config))
    flops = prefill_flops(model.config, model, T)
    out["tflops"] = flops / run["total"] / 1e9
    out["floor_fraction"] = out["tflops"] * 1e12 / BF16_FLOP_PER_S
    if one_pass:

        def forward():
            with torch.no_grad():
                cache = model.allocate_cache(1, T)
                model.lm_head(model.hidden_states(ids, cache=cache)[:, -1])

        out["one_pass_ms"] = median_ms(forward, reps, warmup=0, cuda=device.type == "cuda")
    return out


def breakdown_prefill(totals: dict[str, float], config: KimiLinearConfig) -> dict[str, float]:
    """Per-part milliseconds: each mixer type split into its kernel/attention call and the rest, MLP,
    embed+head,
    and 'other' (time outside every span: Python and launch gaps)."""
    out: dict[str, float] = {}
    for kind in dict.fromkeys(config.layer_types):
        mixer = totals.get(f"{kind}_mixer", 0.0)
        core = totals.get("mla_attention" if kind == "mla" else "linear_kernel", 0.0)
        out[f"{kind}_core"] = core
        out[f"{kind}_rest"] = mixer - core
    out["mlp"] = totals.get("mlp", 0.0)
    out["embed_head"] = totals.get("embed", 0.0) + totals.get("head", 0.0)
    top = sum(v for k, v in totals.items() if k.endswith("_mixer") or k in ("mlp", "embed", "head"))
    out["other"] = totals["total"] - top
    return out


# ---- decode ------------------------------------------------------------------------------------------------


@torch.no_grad()
def fill_cache(cache, context: int, seed: int = 0) -> None:
    """Synthetic cache contents for a decode at ``context`` tokens: random latents / rope keys / conv tails
    (unit
    normal), random KDA states (std 0.02), and every row's length set to ``context``."""
    gen = torch.Generator(device=cache.device)
    gen.manual_seed(seed)
    for entry in cache.layers:
        for name, t in entry.items():
            t.normal_(0.0, 0.02 if name == "state" else 1.0, generator=gen)
    cache.lengths.fill_(context)


def decode_bytes(model, cache, batch: int, context: int) -> int:
    """Fewest bytes one decode step moves: the weights (not the embedding table), each MLA cache row up to
    ``context`` read once, each recurrent state read and written."""
    total = weight_bytes_per_step(model)
    for kind, entry in zip(model.config.layer_types, cache.layers, strict=True):
        if kind == "mla":
            total += (
                batch
                * context
                * (entry["latent"].shape[-1] + entry["k_pe"].shape[-1])
                * entry["latent"].element_size()
            )
        elif kind in LINEAR_TYPES:
            total += (
                2 * entry["state"][:batch].numel() * 4
                + 2 * entry["conv"][:batch].numel() * entry["conv"].element_size()
            )
    return total


@torch.no_grad()
def decode_parts_ms(model, cache, batch: int, reps: int) -> dict[str, float]:
    """Milliseconds of each part of a decode step, each captured alone in a CUDA graph: every layer's mixer
    (with
    its input norm) and MLP, and the final norm + head. Summed per layer type."""
    device = model.device
    x = torch.randn(batch, 1, model.config.hidden_size, device=device, dtype=model.dtype)
    out: dict[str, float] = {}
    for layer in model.model.layers:
        ffn = layer.block_sparse_moe if layer.is_moe else layer.mlp
        parts = {
            f"{layer.layer_type}_mixer": lambda layer=layer: layer.self_attn(
                layer.input_layernorm(x), cache=cache
            ),
            "mlp": lambda layer=layer, ffn=ffn: ffn(layer.post_attention_layernorm(x)),
        }
        for name, fn in parts.items():
            out[name] = out.get(name, 0.0) + graph_ms(fn, device, reps)
    out["head"] = graph_ms(lambda: model.lm_head(model.model.norm(x[:, 0])).float(), device, reps)
    return out


class GraphDecoder:
    """``generate.decode_step`` captured in one CUDA graph, as ``generate.CudaGraphDecoder`` does, except that
    the
    warm-up's memory is released before the capture: the memory-filling batch then needs one decode workspace,
    not two. Capture runs on the empty cache, which is reset afterwards (the graph keeps its tensors)."""

    def __init__(self, model, cache, tokens: torch.Tensor):
        from kimi_linear.generate import decode_step

        self.tokens = tokens
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            decode_step(model, tokens, cache)  # compiles kernels outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode_step(model, tokens, cache)
        cache.reset()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


def time_decode(model, batch: int, context: int, steps: int, parts: bool, eager: bool = True) -> dict:
    """Decode-step time with a synthetic cache of ``context`` tokens per row: CUDA-graph replay (plain
    ``decode_step`` on CPU), optionally the eager step and the per-part graphs."""
    from kimi_linear.generate import decode_step

    device = model.device
    cache = model.allocate_cache(batch, context + steps + 32)
    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    step = (
        GraphDecoder(model, cache, tokens)
        if device.type == "cuda"
        else lambda: decode_step(model, tokens, cache)
    )
    fill_cache(cache, context)
    out = dict(batch=batch, context=context)
    out["step_ms"] = median_ms(step, steps, warmup=3, cuda=device.type == "cuda")
    out["ms_per_token"] = out["step_ms"] / batch
    out["floor_ms"] = decode_bytes(model, cache, batch, context) / HBM_BYTES_PER_S * 1e3
    if eager and device.type == "cuda":
        out["eager_ms"] = median_ms(lambda: decode_step(model, tokens, cache), 5, warmup=2, cuda=True)
    if parts:
        out["parts_ms"] = decode_parts_ms(model, cache, batch, reps=max(3, steps // 2))
    return out


@torch.no_grad()
def per_sequence_bytes(model, context: int) -> dict[str, int]:
    """Cache bytes and decode-workspace bytes per sequence at ``context`` (and the workspace's fixed part),
    from the allocator at batch 1 and 2 (one eager decode step each). CUDA only."""
    from kimi_linear.generate import decode_step

    device = model.device
    measured = {}
    for batch in (1, 2):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        cache = model.allocate_cache(batch, context + 64)
        cache_bytes = torch.cuda.memory_allocated(device) - base
        fill_cache(cache, context)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        decode_step(model, torch.zeros(batch, dtype=torch.long, device=device), cache)
        sync(device)
        measured[batch] = (cache_bytes, torch.cuda.max_memory_allocated(device) - before)
        del cache
    torch.cuda.empty_cache()
    cache_seq = measured[2][0] - measured[1][0]
    work_seq = max(measured[2][1] - measured[1][1], 0)
    return dict(cache=cache_seq, workspace=work_seq, workspace_fixed=max(measured[1][1] - work_seq, 0))


def largest_batch(free_bytes: int, per_seq: dict[str, int], reserve_bytes: int) -> int:
    """Sequences that fit: (free - reserve - fixed workspace) / (cache + workspace per sequence), >= 0."""
    room = free_bytes - reserve_bytes - per_seq["workspace_fixed"]
    return max(int(room // (per_seq["cache"] + per_seq["workspace"])), 0)


def time_full_batch(model, context: int, steps: int, reserve_bytes: int, cpu_budget_bytes: int) -> dict:
    """Decode-step time at the largest batch that fits at ``context`` (8% smaller again on out-of-memory)."""
    device = model.device
    if device.type == "cuda":
        per_seq = per_sequence_bytes(model, context)
        free = torch.cuda.mem_get_info(device)[0]
    else:  # no allocator statistics: the cache alone against a pretend budget
        per_seq = dict(
            cache=cache_bytes_per_sequence(model.config, context, 4)["hybrid"], workspace=0, workspace_fixed=0
        )
        free = cpu_budget_bytes
    batch = largest_batch(free, per_seq, reserve_bytes)
    tried = []
    for _ in range(5):
        if batch < 1:
            break
        try:
            out = time_decode(model, batch, context, steps, parts=False, eager=False)
            return dict(out, free_bytes=free, per_sequence=per_seq, fill="synthetic", tried=tried)
        except RuntimeError as e:  # out of memory, possibly surfacing as a failed graph capture
            tried.append(dict(batch=batch, error=f"{type(e).__name__}: {e}"[:200]))
        # the failed attempt's tensors are released once the exception is gone
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        batch = int(batch * 0.92)
    return dict(batch=0, context=context, free_bytes=free, per_sequence=per_seq, error="no batch fits",
                tried=tried)


# ---- cache bytes -------------------------------------------------------------------------------------------


def cache_bytes(model, context: int) -> dict:
    """One sequence's cache at ``context``: allocator delta (CUDA), tensor bytes, and the ``info`` formula."""
    device = model.device
    dtype_bytes = torch.finfo(model.dtype).bits // 8
    formula = cache_bytes_per_sequence(model.config, context, dtype_bytes)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
    cache = model.allocate_cache(1, context)
    measured = torch.cuda.memory_allocated(device) - base if device.type == "cuda" else None
    out = dict(
        context=context,
        allocated_bytes=measured,
        tensor_bytes=cache.nbytes(),
        formula_bytes=formula["hybrid"],
        formula_mla_only_bytes=formula["mla_only"],
    )
    del cache
    return out


# ---- the run -----------------------------------------------------------------------------------------------


class Results:
    """The JSON document, rewritten (atomically) after every measurement."""

    def __init__(self, out: str | Path, meta: dict):
        self.out = out
        self.doc = dict(meta=meta, models={}, cache=[], prefill=[], decode=[], full_batch=[], skipped=[])

    def add(self, key: str, row: dict) -> None:
        self.doc[key].append(row)
        self.save()

    def save(self) -> None:
        write_json(self.out, "model_efficiency.json", self.doc)


def run_environment(device: torch.device, args) -> dict:
    """``benchmarks.common.environment`` plus this run's device, size settings and memory."""
    meta = environment(args, device=str(device), smoke=args.smoke, piece=args.piece, layers=args.layers)
    if device.type == "cuda":
        meta["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return meta


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(args) -> dict:
    start = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    contexts = (
        [int(c) for c in args.contexts.split(",")]
        if args.contexts
        else list(SMOKE_CONTEXTS if args.smoke else CONTEXTS)
    )
    batch_contexts = (
        [int(c) for c in args.batch_contexts.split(",")]
        if args.batch_contexts
        else list(SMOKE_BATCH_CONTEXTS if args.smoke else BATCH_CONTEXTS)
    )
    names = args.models.split(",")
    meta = dict(run_environment(device, args), dtype=str(dtype).replace("torch.", ""))
    results = Results(args.out, meta)
    max_context = max(contexts + batch_contexts)
    configs = {n: make_config(n, args.smoke, args.layers, max_context) for n in names}
    reserve = int(args.reserve_gib * GIB) if device.type == "cuda" else 0
    elapsed = lambda: time.time() - start

    def over_budget(what: str, predicted_s: float = 0.0) -> bool:
        if elapsed() + predicted_s <= args.budget_s:
            return False
        results.add("skipped", dict(what=what, elapsed_s=elapsed(), predicted_s=predicted_s))
        log(f"skip {what}: {elapsed():.0f}s elapsed + {predicted_s:.0f}s predicted > budget {args.budget_s}s")
        return True

    def attempt(what: str, fn, *fn_args, **fn_kwargs):
        """fn(...) or None: a failure (out of memory, a kernel limit) is recorded and the run goes on."""
        try:
            return fn(*fn_args, **fn_kwargs)
        except Exception as e:  # noqa: BLE001 - one failed measurement must not lose the others
            results.add(
                "skipped", dict(what=what, elapsed_s=elapsed(), error=f"{type(e).__name__}: {e}"[:500])
            )
            log(f"FAILED {what}: {type(e).__name__}: {str(e)[:300]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    # Decode and cache, one model on the device at a time (the full-batch runs get the whole memory).
    for name in names:
        model = make_model(configs[name], device, dtype)
        results.doc["models"][name] = dict(
            label=LABELS[name],
            layer_types=configs[name].layer_types,
            params=sum(p.numel() for p in model.parameters()),
            config=configs[name].to_dict(),
        )
        for T in contexts:
            row = attempt(f"cache {name} T={T}", cache_bytes, model, T)
            if row:
                results.add("cache", dict(model=name, **row))
        for T in contexts:
            if over_budget(f"decode {name} B=1 T={T}"):
                break
            row = attempt(f"decode {name} B=1 T={T}", time_decode, model, 1, T, args.steps, parts=True)
            if row:
                results.add("decode", dict(model=name, fill="synthetic", **row))
                log(f"decode {name} B=1 T={T}: {row['step_ms']:.3f} ms (eager {row.get('eager_ms', 0):.2f})")
        for T in batch_contexts:
            if over_budget(f"full-batch decode {name} T={T}"):
                break
            row = attempt(
                f"full-batch decode {name} T={T}",
                time_full_batch,
                model,
                T,
                max(3, args.steps // 4),
                reserve,
                int(args.cpu_budget_mib * 2**20),
            )
            if row:
                results.add("full_batch", dict(model=name, **row))
                log(
                    f"full batch {name} T={T}: B={row['batch']} "
                    f"step {row.get('step_ms', float('nan')):.2f} ms"
                )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Prefill, context by context with the three models side by side.
    models = {n: make_model(configs[n], device, dtype) for n in names}
    for name in names:  # compile the kernels, settle the allocator
        attempt(f"prefill warm-up {name}", time_prefill, models[name], contexts[0], args.piece, 1, False)
    last: dict[str, tuple[int, float]] = {}
    for T in contexts:
        for name in names:
            predicted = 0.0
            if name in last:  # at most quadratic growth from the last measured context
                t_prev, ms_prev = last[name]
                predicted = ms_prev * (T / t_prev) ** 2 / 1e3
            if over_budget(f"prefill {name} T={T}", predicted):
                continue
            reps = args.reps if T <= 32768 else (2 if T <= 262144 else 1)
            row = attempt(
                f"prefill {name} T={T}",
                time_prefill,
                models[name],
                T,
                args.piece,
                reps,
                one_pass=T <= args.one_pass_max,
            )
            if row:
                results.add("prefill", dict(model=name, context=T, **row))
                last[name] = (T, row["ms"])
                log(
                    f"prefill {name} T={T}: {row['ms']:.1f} ms ({row['tflops']:.0f} TFLOP/s) "
                    f"one-pass {row.get('one_pass_ms', float('nan')):.1f} ms"
                )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results.doc["meta"]["wall_s"] = elapsed()
    results.save()
    return results.doc


# ---- report ------------------------------------------------------------------------------------------------


def _index(rows: list[dict], *keys: str) -> dict:
    return {tuple(r[k] for k in keys): r for r in rows}


def summary_rows(doc: dict) -> list[dict]:
    """One row per context: prefill ms, TPOT at batch 1, full-batch ms/token, cache bytes, ratios vs MLA."""
    prefill, decode = _index(doc["prefill"], "model", "context"), _index(doc["decode"], "model", "context")
    full, cache = _index(doc["full_batch"], "model", "context"), _index(doc["cache"], "model", "context")
    contexts = sorted({r["context"] for key in ("prefill", "decode", "cache") for r in doc[key]})
    rows = []
    for T in contexts:
        row = {"context": T}
        for name in doc["models"]:
            p, d, f, c = (t.get((name, T)) for t in (prefill, decode, full, cache))
            row[f"{name}.prefill_ms"] = p and p["ms"]
            row[f"{name}.tpot_ms"] = d and d["step_ms"]
            row[f"{name}.full_batch"] = f and f.get("batch")
            row[f"{name}.full_ms_per_token"] = f and f.get("ms_per_token")
            row[f"{name}.cache_bytes"] = c and (c["allocated_bytes"] or c["tensor_bytes"])
        for name in doc["models"]:
            if name == "mla_only":
                continue
            for key in ("prefill_ms", "tpot_ms", "full_ms_per_token", "cache_bytes"):
                ours, base = row.get(f"{name}.{key}"), row.get(f"mla_only.{key}")
                if not (ours and base):
                    row[f"{name}.{key}.vs_mla"] = None
                else:  # speed-up (base / ours) for times, fraction (ours / base) for the cache
                    row[f"{name}.{key}.vs_mla"] = ours / base if key == "cache_bytes" else base / ours
        rows.append(row)
    return rows


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _ctx(T: int) -> str:
    return (
        f"{T >> 20}M" if T >= 1 << 20 and T % (1 << 20) == 0 else (f"{T >> 10}k" if T % 1024 == 0 else str(T))
    )


SHORT = {"kimi_linear": "KL", "mla_only": "MLA", "gdn_hybrid": "GDN-H"}
# (key in summary_rows, title, value format, what the ratio column shows)
SECTIONS = (
    ("prefill_ms", "prefill ms, B=1", ".1f", "x"),
    ("tpot_ms", "TPOT ms, B=1, CUDA graph", ".3f", "x"),
    ("full_ms_per_token", "ms per output token at the memory-filling batch (step / B)", ".4f", "x"),
    ("cache_bytes", "cache MiB per sequence (allocated)", ".2f", "%"),
)


def _table(head: list[str], lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(c) + " |" for c in lines])
    widths = [max([len(h)] + [len(c[i]) for c in lines]) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
    return "\n".join([fmt(head)] + [fmt(c) for c in lines])


def table(doc: dict, markdown: bool = False) -> str:
    """The result tables: one per measure, a column per model, and the ratio to MLA-only (speed-up, or the
    cache as a percentage of MLA-only's); full-batch cells also give the batch size."""
    names = list(doc["models"])
    rows = summary_rows(doc)
    others = [n for n in names if n != "mla_only"]
    out = []
    for key, title, spec, ratio in SECTIONS:
        head = ["context"] + [SHORT.get(n, n) for n in names]
        head += [f"{SHORT.get(n, n)} {'vs MLA' if ratio == 'x' else '% of MLA'}" for n in others]
        lines = []
        for r in rows:
            cells = [_ctx(r["context"])]
            for n in names:
                v = r[f"{n}.{key}"]
                if key == "cache_bytes":
                    cells.append(_fmt(None if v is None else v / 2**20, spec))
                elif key == "full_ms_per_token" and v is not None:
                    cells.append(f"{v:{spec}} (B={r[f'{n}.full_batch']})")
                else:
                    cells.append(_fmt(v, spec))
            for n in others:
                v = r[f"{n}.{key}.vs_mla"]
                cells.append("-" if v is None else (f"{v:.2f}x" if ratio == "x" else f"{100 * v:.1f}%"))
            if any(c != "-" for c in cells[1:]):
                lines.append(cells)
        out.append(("**" + title + "**" if markdown else title) + "\n\n" + _table(head, lines, markdown))
    return "\n\n".join(out)


def breakdown_table(doc: dict, markdown: bool = False) -> str:
    """Prefill and batch-1 decode breakdowns (ms per part) at every measured context."""
    lines = []
    for r in doc["prefill"]:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["breakdown"].items())
        lines.append(f"prefill {r['model']} {_ctx(r['context'])}: {r['ms']:.1f} ms = {parts}")
    for r in doc["decode"]:
        if "parts_ms" not in r:
            continue
        parts = ", ".join(f"{k} {v:.3f}" for k, v in r["parts_ms"].items())
        eager = f", eager step {r['eager_ms']:.3f}" if "eager_ms" in r else ""
        lines.append(
            f"decode {r['model']} {_ctx(r['context'])}: graph step {r['step_ms']:.3f} ms "
            f"(floor {r['floor_ms']:.3f}){eager}; parts in graphs: {parts}"
        )
    return "\n".join(("- " + line) if markdown else line for line in lines)


def plot(doc: dict, out_dir: str) -> list[str]:
    """Fig. 7 style (prefill s and TPOT ms vs context, log-x) and Fig. 1 style speedups vs MLA-only."""
    plt = pyplot()

    names = list(doc["models"])
    styles = {
        "kimi_linear": ("tab:blue", "o"),
        "mla_only": ("tab:red", "s"),
        "gdn_hybrid": ("tab:green", "^"),
    }
    gpu = doc["meta"].get("gpu", doc["meta"]["device"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        color, marker = styles.get(name, (None, "o"))
        p = sorted((r["context"], r["ms"] / 1e3) for r in doc["prefill"] if r["model"] == name)
        d = sorted(
            (r["context"], r["step_ms"]) for r in doc["decode"] if r["model"] == name and r["batch"] == 1
        )
        for ax, pts in ((axes[0], p), (axes[1], d)):
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, color=color, label=LABELS.get(name, name))
    axes[0].set(title="(a) prefill time, batch 1", ylabel="seconds")
    axes[1].set(title="(b) time per output token, batch 1 (CUDA graph)", ylabel="ms")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend()
        ticks = sorted({r["context"] for r in doc["prefill"] + doc["decode"]})
        ax.set_xticks(ticks, [_ctx(t) for t in ticks])
    fig.suptitle(
        f"Prefill and decode vs context — {gpu}, random weights, {doc['meta'].get('dtype', '')}", fontsize=10
    )
    fig.tight_layout()
    paths = [os.path.join(out_dir, "model_efficiency.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    rows = summary_rows(doc)
    fig, ax = plt.subplots(figsize=(8, 5))
    series = (
        ("prefill_ms", "prefill, B=1", "-", 2.9),
        ("tpot_ms", "TPOT, B=1", "--", 2.0),
        ("full_ms_per_token", "time/token, memory-filling batch", ":", 6.0),
    )
    for name in names:
        if name == "mla_only":
            continue
        color, marker = styles.get(name, (None, "o"))
        for key, what, line, _ in series:
            pts = [(r["context"], r[f"{name}.{key}.vs_mla"]) for r in rows if r.get(f"{name}.{key}.vs_mla")]
            if pts:
                label = f"{SHORT.get(name, name)}: {what}"
                ax.plot(*zip(*pts, strict=True), line, marker=marker, color=color, label=label)
    for _, what, line, target in series:
        ax.axhline(target, color="gray", linestyle=line, linewidth=0.8)
        ax.text(0.01, target, f"target {target}x ({what.split(',')[0]})", transform=ax.get_yaxis_transform(),
                ha="left", va="bottom", fontsize=7, color="gray")
    # the paper's Kimi Linear vs MLA: Fig. 7a prefill at 512k and 1M, Fig. 1b decode at 1M
    paper = [(524288, 2.3), (1 << 20, 2.9), (1 << 20, 6.3)]
    ax.plot(*zip(*paper, strict=True), "k*", markersize=9, label="paper (prefill 512k/1M; 1M decode)")
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["context"] for r in rows})
    ax.set_xticks(ticks, [_ctx(t) for t in ticks])
    ax.set(
        xlabel="context length (tokens)",
        ylabel="speed-up vs MLA-only (x)",
        title=f"Speed-up over full attention (MLA) — {gpu}",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.9), title_fontsize=7,
              title="KL = Kimi Linear, GDN-H = GDN hybrid")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "model_efficiency_speedup.png"))
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def estimated_mla_only_prefill(doc: dict) -> dict[int, float]:
    """MLA-only prefill ms where it was not measured but Kimi Linear's was: Kimi Linear's MLA layer (mixer)
    time for every layer, plus its MLP, embedding/head and other time (the same modules in both models)."""
    if "kimi_linear" not in doc["models"] or "mla_only" not in doc["models"]:
        return {}
    n_layers = len(doc["models"]["mla_only"]["layer_types"])
    n_mla = doc["models"]["kimi_linear"]["layer_types"].count("mla")
    measured = {r["context"] for r in doc["prefill"] if r["model"] == "mla_only"}
    out = {}
    for r in doc["prefill"]:
        if r["model"] == "kimi_linear" and r["context"] not in measured:
            b = r["breakdown"]
            mla_layer = (b["mla_core"] + b["mla_rest"]) / n_mla
            out[r["context"]] = n_layers * mla_layer + b["mlp"] + b["embed_head"] + b["other"]
    return out


def report(doc: dict, out_dir: str, markdown: bool = False) -> None:
    paths = plot(doc, out_dir)
    meta = doc["meta"]
    print(
        f"\n{meta.get('gpu', meta['device'])}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}"
    )
    for s in doc["skipped"]:
        print(f"skipped: {s['what']}")
    print(breakdown_table(doc))
    for r in doc["full_batch"]:
        if r.get("batch"):
            ps = r["per_sequence"]
            print(
                f"full batch {r['model']} {_ctx(r['context'])}: B={r['batch']} step {r['step_ms']:.2f} ms "
                f"(floor {r['floor_ms']:.2f}); per sequence: cache {ps['cache'] / 2**20:.1f} MiB + decode "
                f"workspace {ps['workspace'] / 2**20:.1f} MiB"
            )
    for r in doc["cache"]:
        alloc = "-" if r["allocated_bytes"] is None else r["allocated_bytes"]
        print(
            f"cache {r['model']} {_ctx(r['context'])}: allocated {alloc} tensors {r['tensor_bytes']} "
            f"formula {r['formula_bytes']}"
        )
    kimi = {r["context"]: r["ms"] for r in doc["prefill"] if r["model"] == "kimi_linear"}
    for T, ms in estimated_mla_only_prefill(doc).items():
        print(f"MLA-only prefill at {_ctx(T)} not measured; estimated from Kimi Linear's MLA layer: "
              f"{ms:.0f} ms (Kimi Linear speed-up {ms / kimi[T]:.2f}x)")
    print("plots: " + ", ".join(paths))
    print(table(doc, markdown))


def parse_args(argv: list[str] | None = None):
    p = SuiteParser(__name__, __doc__)
    p.add_argument("--smoke", action="store_true", help="tiny config on the CPU, short contexts")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--contexts", default=None, help="comma-separated prefill/decode contexts")
    p.add_argument("--batch-contexts", default=None, help="contexts of the memory-filling batch decode")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument(
        "--piece", type=int, default=None, help="tokens per KDA/GDN prefill piece (131072; smoke 64)"
    )
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per measurement")
    p.add_argument("--reps", type=int, default=3, help="timed prefills per context up to 32k (then 1)")
    p.add_argument(
        "--one-pass-max", type=int, default=32768, help="also time the one-pass forward up to here"
    )
    p.add_argument("--budget-s", type=float, default=510.0, help="skip measurements that would end past this")
    p.add_argument(
        "--reserve-gib", type=float, default=3.0, help="memory left free at the memory-filling batch"
    )
    p.add_argument("--cpu-budget-mib", type=float, default=16.0, help="pretend memory for the CPU full batch")
    p.add_argument("--plot-only", default=None, help="redraw plots and table from this JSON")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = p.parse_args(argv)
    if args.piece is None:
        args.piece = 64 if args.smoke else 131072
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        with open(args.plot_only) as f:
            doc = json.load(f)
        report(doc, os.path.dirname(os.path.abspath(args.plot_only)), args.markdown)
        return doc
    doc = run(args)
    report(doc, args.out, args.markdown)
    return doc

