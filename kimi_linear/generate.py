"""Generation: ``prefill`` (chunk kernel, prompts packed varlen), ``decode_step`` (recurrent KDA + absorbed
MLA),
``generate`` (batched prompts of different lengths, greedy / temperature / top-k / top-p, stop tokens,
streaming).

Prompts of different lengths are packed along T with ``cu_seqlens`` rather than padded, so a batch computes
exactly what each prompt alone computes (no padding exists to leak). Each prompt owns one cache row; decoding
advances all rows by one token per step. ``decode_step`` does no host synchronisation and allocates no new
shapes, so on CUDA ``generate`` captures it once in a CUDA graph and replays it every token (one replay per
step).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Sequence

import torch

from kimi_linear.cache import KimiLinearCache, check_state_dtype
from kimi_linear.ops.varlen import remember_host_values


def _validate_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"a prompt tensor must be [B, T], got shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        p = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in p):
            raise ValueError(f"prompt {i} holds token ids outside [0, vocab_size={vocab_size})")
        out.append(p)
    return out


def validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError naming the parameter unless temperature >= 0, top_k >= 0 (0 = off), 0 < top_p <= 1."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Next token per row of ``logits [N, V]`` -> ``[N]`` long, one setting for all rows (see ``sample_rows``).

    temperature 0 is greedy (argmax). Otherwise each row takes one uniform draw from ``rng`` in row order (None:
    torch's global generator), so a seeded ``random.Random`` makes the tokens reproducible.
    """
    validate_sampling(temperature, top_k, top_p)
    N = logits.shape[0]
    if temperature == 0:
        return logits.float().argmax(dim=-1)
    uniforms = [rng.random() for _ in range(N)] if rng is not None else torch.rand(N, dtype=torch.float64).tolist()
    return sample_rows(logits, [temperature] * N, [top_k] * N, [top_p] * N, uniforms)


def sample_rows(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ks: Sequence[int],
    top_ps: Sequence[float],
    uniforms: Sequence[float],
) -> torch.Tensor:
    """Next token per row of ``logits [N, V]``, each row with its own settings, in one batch of kernels.

    Row i with temperatures[i] = 0 takes its argmax. Otherwise the distribution is softmax(logits_i /
    temperature_i) restricted to its top_ks[i] most likely tokens (0 = all; ties broken by the sort) and to the
    smallest set of those whose probability reaches top_ps[i] (the most likely token always stays),
    renormalised; the token is the one at which the cumulative probability, most likely first, passes
    uniforms[i] in [0, 1) (inverse-CDF sampling: one number per row, drawn by the caller, so a row's tokens do
    not depend on the other rows of the batch). Settings are the caller's to validate (``validate_sampling``).

    Returns ``[N]`` long on logits' device.
    """
    logits = logits.float()  # [N, V]
    N, V = logits.shape
    device = logits.device
    # through pinned memory on CUDA: the copy does not wait for the GPU (a serving engine runs ahead of it)
    params = torch.tensor([temperatures, top_ks, top_ps, uniforms], dtype=torch.float64,
                          pin_memory=device.type == "cuda").to(device, non_blocking=True)  # [4, N]
    temperature, top_k, top_p, u = params.unbind(0)
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature).float()[:, None]
    if all(k == 0 or k >= V for k in top_ks) and all(p >= 1 for p in top_ps):
        order, probs = None, scaled.softmax(-1)  # no filter: no sort
    else:
        scaled, order = scaled.sort(dim=-1, descending=True)  # [N, V] most likely first
        rank = torch.arange(V, device=device)
        keep = rank[None, :] < torch.where(top_k > 0, top_k, V)[:, None]
        probs = scaled.masked_fill(~keep, float("-inf")).softmax(-1)
        # drop a token when the tokens before it already reach top_p
        keep &= (probs.cumsum(-1) - probs) < top_p.float()[:, None]
        probs = probs.masked_fill(~keep, 0.0)
    cdf = probs.double().cumsum(-1)  # [N, V]
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=V - 1)  # [N, 1]
    tokens = pick[:, 0] if order is None else order.gather(-1, pick)[:, 0]
    return torch.where(greedy, logits.argmax(-1), tokens)


@torch.no_grad()
def prefill(model, prompts: list[list[int]], cache: KimiLinearCache) -> torch.Tensor:
    """Run the prompts (packed varlen, chunk kernel) into an empty ``cache`` with one row per prompt.

    Returns the logits of each prompt's last token, ``[N, vocab]`` fp32.
    """
    device = model.device
    lengths = [len(p) for p in prompts]
    flat = [t for p in prompts for t in p]
    ids = torch.tensor(flat, dtype=torch.long, device=device)[None]  # [1, sum T]
    remember_host_values(ids, flat)  # checked against the vocabulary on the host (done above already)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = torch.tensor(bounds, dtype=torch.long, device=device)
    remember_host_values(cu, bounds)  # the ops read the boundaries on the host: no read-back
    hidden = model.hidden_states(ids, cache=cache, cu_seqlens=cu)  # [1, sum T, D]
    last = hidden[0, cu[1:] - 1]  # [N, D]
    return model.lm_head(last).float()


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, cache: KimiLinearCache) -> torch.Tensor:
    """One token for every cache row: ``tokens [N]`` long -> next-token logits ``[N, vocab]`` fp32.

    Recurrent KDA kernel with the state updated in place, absorbed MLA over the latent cache. No input checks,
    no host sync: capturable in a CUDA graph (the caller guarantees the cache has room).
    """
    hidden = model.model(tokens[:, None], cache=cache)  # [N, 1, D]
    cache.lengths += 1
    return model.lm_head(hidden[:, 0]).float()


@torch.no_grad()
def piece_step(model, tokens: torch.Tensor, cache: KimiLinearCache) -> torch.Tensor:
    """A prefill piece of up to T tokens for every row of a ``piece_view`` cache: ``tokens [N, T]`` long, of which
    row i's first ``cache.new_tokens[i]`` are real and the rest padding -> the next-token logits after each row's
    last real token ``[N, vocab]`` fp32 (a row with no real token gives garbage), with the rows' states, conv
    tails and latents advanced by their real tokens only and ``cache.lengths += cache.new_tokens``.

    The same function of the tokens as a packed prefill (``prefill``), computed as ``decode_step`` computes a
    token (absorbed MLA over the latents), with the same kernels whatever the lengths: no input checks, no host
    sync, capturable in a CUDA graph for each (N, T).
    """
    hidden = model.model(tokens, cache=cache)  # [N, T, D]
    last = (cache.new_tokens - 1).clamp(min=0)
    cache.lengths += cache.new_tokens
    return model.lm_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).float()


class CudaGraphDecoder:
    """``decode_step`` captured once in a CUDA graph; ``__call__(tokens)`` copies the tokens in and replays.

    Build it on the freshly allocated cache, before prefill: warm-up and capture run real steps, after which
    the cache is reset to empty in place (the graph keeps pointing at the same tensors).
    """

    def __init__(self, model, cache: KimiLinearCache, warmup: int = 2):
        self.cache = cache
        self.tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=cache.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up compiles kernels and settles allocations outside the graph
            for _ in range(warmup):
                decode_step(model, self.tokens, cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode_step(model, self.tokens, cache)
        cache.reset()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate(
    model,
    prompts,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    max_length: int | None = None,
    seed: int | None = None,
    use_cuda_graph: bool = True,
    state_dtype: torch.dtype = torch.float32,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: a ``KimiLinearForCausalLM``.
        prompts: list of token-id lists (different lengths allowed) or a ``[B, T]`` tensor.
        max_new_tokens: >= 1.
        temperature, top_k, top_p: sampling (temperature 0 = greedy); see ``sample``.
        stop_tokens: ids that end a sequence (the stop token is included in its output). Default: the config's
            eos_token_id.
        on_token: streaming callback ``on_token(prompt_index, token_id)``, called for each new token as it is
            produced.
        max_length: cache length per sequence; default longest prompt + max_new_tokens.
        seed: seed of the sampling generator (sampling is deterministic for a given seed); default: drawn
            from torch's global generator.
        use_cuda_graph: on CUDA, capture the decode step in a CUDA graph (falls back to eager with a warning
            if capture fails).
        state_dtype: dtype of the cache's KDA recurrent states: torch.float32 (default) or torch.bfloat16, half
            the state bytes a decode step moves (``cache.KimiLinearCache``; its effect on the logits is
            measured in benchmarks/RESULTS.md, "Decode").

    Returns:
        The generated tokens of each prompt (without the prompt).

    Raises:
        ValueError: empty prompts or prompt list, ids outside the vocabulary, bad sampling parameters,
            max_new_tokens < 1, prompt + max_new_tokens longer than max_length / the model's model_max_length,
            or a state_dtype other than float32 / bfloat16.
    """
    config = model.config
    check_state_dtype(state_dtype)
    prompts = _validate_prompts(prompts, config.vocab_size)
    validate_sampling(temperature, top_k, top_p)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    longest = max(len(p) for p in prompts)
    needed = longest + max_new_tokens
    if max_length is None:
        max_length = needed
    if needed > max_length:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {needed} "
            f"exceeds max_length={max_length}"
        )
    if needed > config.model_max_length:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's model_max_length={config.model_max_length}"
        )
    if stop_tokens is None:
        stop_tokens = [] if config.eos_token_id is None else [config.eos_token_id]
    stop = set(int(t) for t in stop_tokens)

    model.pack_for_inference()
    device = model.device
    rng = None
    if temperature > 0:
        # Without a seed, draw one from torch's global generator (reproducible under torch.manual_seed).
        rng = random.Random(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    N = len(prompts)
    # Room for the warm-up steps of the graph capture; prefill starts from the reset (empty) cache anyway.
    cache = KimiLinearCache(
        config, N, min(max(max_length, 3), config.model_max_length), dtype=model.dtype, device=device,
        state_dtype=state_dtype,
    )
    step = lambda tokens: decode_step(model, tokens, cache)
    if use_cuda_graph and device.type == "cuda" and max_new_tokens > 1:
        try:
            step = CudaGraphDecoder(model, cache)
        except Exception as e:  # a mixer that cannot be captured: decode eagerly
            warnings.warn(
                f"CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); decoding eagerly",
                stacklevel=2,
            )
            torch.cuda.synchronize()
            cache.reset()
    logits = prefill(model, prompts, cache)

    outputs: list[list[int]] = [[] for _ in range(N)]
    done = [False] * N
    for i in range(max_new_tokens):
        tokens = sample(logits, temperature, top_k, top_p, rng)  # [N]
        host = tokens.tolist()
        for n, t in enumerate(host):
            if done[n]:
                continue
            outputs[n].append(t)
            if on_token is not None:
                on_token(n, t)
            if t in stop:
                done[n] = True
        if all(done) or i == max_new_tokens - 1:
            break
        logits = step(tokens)
    return outputs
