"""The paper's synthetic tasks (§5.1, Fig. 4): generators, the small model, and its training/evaluation loop.

Three tasks, each a batch of token sequences of exactly ``seq_len`` tokens with a target at every *answer*
position and ``IGNORE_INDEX`` elsewhere, so the loss and the accuracy count answers only. Every answer is also
the next input token (``targets[t] == input_ids[t + 1]`` where ``targets[t]`` is set): the sequences read as
ordinary text.

* **MQAR** (multi-query associative recall, after Zoology): P key–value pairs ``k1 v1 k2 v2 ...``, then the
  rest of the sequence holds filler with each of the P keys queried once, in random order, at random places:
  ``... k v ...``. The answer is the value stored with the key. Tokens: 0 filler, keys 1..V/2-1, values
  V/2..V-1.
* **Palindrome**: L random tokens, a separator, then the same tokens reversed; every token after the separator
  is an answer (L = (seq_len - 1) // 2; a spare last token is padding). Tokens: 0 padding, 1 separator, 2..V-1
  content.
* **Stack** (state tracking): S = 64 stacks driven by a random program of ``PUSH_s v`` (push value v on stack
  s) and ``POP_s v`` (the v is the value popped, the answer). Pops only target non-empty stacks. Tokens: 0
  padding, PUSH_s = 1 + s, POP_s = 1 + S + s, values 1 + 2S..V-1.

Generation is seeded and deterministic (``numpy.random.default_rng(seed)``): the same (task, sizes, seed)
gives the same tensors on any machine. Training draws batch i from seed ``(seed, i)``, and the evaluation set
from a separate seed stream, so a run never evaluates on its training sequences and restarting a run
reproduces it.

The model is the paper's: 2 layers, 2 heads of dimension 128, no MoE, with the token mixer chosen by
``mixer``: "kda", "gdn" (KDA with one scalar gate per head), "mamba2", or "attention" (MLA in every layer).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
TASKS = ("mqar", "palindrome", "stack")
MIXERS = ("kda", "gdn", "mamba2", "attention")
NUM_STACKS = 64
# Default vocabulary sizes (the paper does not give its own). Small, because every answer token's embedding
# and output row must be learnt within a few hundred steps (at 260 tokens MQAR learns several times slower
# than at 64), yet MQAR at 2048 tokens still has distinct keys for its 64 pairs (79 key tokens) and Stack has
# 31 values.
DEFAULT_VOCAB = {"mqar": 160, "palindrome": 64, "stack": 160}
_EVAL_SEED_OFFSET = 1_000_003


def default_num_kv_pairs(seq_len: int) -> int:
    """MQAR's number of key-value pairs when not given: seq_len / 32 (8 at 256 tokens, 64 at 2048)."""
    return max(1, seq_len // 32)


def _check_sizes(name: str, num_examples: int, seq_len: int, vocab_size: int) -> None:
    for arg, value in (("num_examples", num_examples), ("seq_len", seq_len), ("vocab_size", vocab_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")


def mqar(
    num_examples: int,
    seq_len: int,
    vocab_size: int = DEFAULT_VOCAB["mqar"],
    num_kv_pairs: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall sequences.

    Args:
        num_examples: number of sequences N.
        seq_len: tokens per sequence T; needs T >= 4 P (the pairs, then room for P two-token queries).
        vocab_size: V, the model's vocabulary; keys are 1..V/2-1 and values V/2..V-1, so V/2 - 1 >= P.
        num_kv_pairs: P, default ``default_num_kv_pairs(seq_len)``.
        seed: generator seed.

    Returns:
        ``(input_ids [N, T] int64, targets [N, T] int64)`` with the value as target at each query key's
        position.

    Raises:
        ValueError: non-positive sizes, T < 4 P, or too few key tokens for P distinct keys.
    """
    _check_sizes("mqar", num_examples, seq_len, vocab_size)
    P = default_num_kv_pairs(seq_len) if num_kv_pairs is None else num_kv_pairs
    if not isinstance(P, (int, np.integer)) or P < 1:
        raise ValueError(f"mqar: num_kv_pairs must be a positive int, got {P!r}")
    if 4 * P > seq_len:
        raise ValueError(f"mqar: seq_len {seq_len} is too short for {P} key-value pairs (needs >= {4 * P})")
    half = vocab_size // 2
    if half - 1 < P:
        raise ValueError(f"mqar: vocab_size {vocab_size} gives {half - 1} keys, fewer than the {P} pairs")
    rng = np.random.default_rng(seed)
    N, T = num_examples, seq_len
    # P distinct keys per row: the first P of a random permutation of the key tokens.
    keys = np.argsort(rng.random((N, half - 1)), axis=1)[:, :P] + 1  # [N, P]
    values = rng.integers(half, vocab_size, size=(N, P))  # [N, P]
    ids = np.zeros((N, T), dtype=np.int64)
    targets = np.full((N, T), IGNORE_INDEX, dtype=np.int64)
    ids[:, 0 : 2 * P : 2], ids[:, 1 : 2 * P : 2] = keys, values
    # The query region [2P, T) is cut into two-token slots; P of them, chosen at random, hold "key value".
    n_slots = (T - 2 * P) // 2
    slots = np.sort(np.argsort(rng.random((N, n_slots)), axis=1)[:, :P], axis=1)  # [N, P]
    order = np.argsort(rng.random((N, P)), axis=1)  # which pair each query asks for: [N, P]
    rows = np.arange(N)[:, None]
    q_pos = 2 * P + 2 * slots  # [N, P]
    ids[rows, q_pos] = keys[rows, order]
    ids[rows, q_pos + 1] = values[rows, order]
    targets[rows, q_pos] = values[rows, order]
    return torch.from_numpy(ids), torch.from_numpy(targets)


def palindrome(
    num_examples: int, seq_len: int, vocab_size: int = DEFAULT_VOCAB["palindrome"], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy-in-reverse sequences: ``x_1 .. x_L SEP x_L .. x_1`` (then one padding token if T is even).

    Args:
        num_examples: N. seq_len: T >= 3. vocab_size: V >= 3 (content tokens 2..V-1). seed: generator seed.

    Returns:
        ``(input_ids [N, T], targets [N, T])``: the L answers sit at positions L .. 2L-1 (from the separator
        on).

    Raises:
        ValueError: non-positive sizes, T < 3 or V < 3.
    """
    _check_sizes("palindrome", num_examples, seq_len, vocab_size)
    if seq_len < 3 or vocab_size < 3:
        raise ValueError(
            f"palindrome: needs seq_len >= 3 and vocab_size >= 3, got {seq_len} and {vocab_size}"
        )
    rng = np.random.default_rng(seed)
    N, T = num_examples, seq_len
    L = (T - 1) // 2
    content = rng.integers(2, vocab_size, size=(N, L))  # [N, L]
    ids = np.zeros((N, T), dtype=np.int64)
    ids[:, :L] = content
    ids[:, L] = 1
    ids[:, L + 1 : 2 * L + 1] = content[:, ::-1]
    targets = np.full((N, T), IGNORE_INDEX, dtype=np.int64)
    targets[:, L : 2 * L] = ids[:, L + 1 : 2 * L + 1]
    return torch.from_numpy(ids), torch.from_numpy(targets)


def stack(
    num_examples: int,
    seq_len: int,
    vocab_size: int = DEFAULT_VOCAB["stack"],
    num_stacks: int = NUM_STACKS,
    push_prob: float = 0.5,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Programs of PUSH/POP on ``num_stacks`` stacks; the answer of ``POP_s`` is the value it pops.

    Each step is a PUSH with probability ``push_prob`` (always when every stack is empty), else a POP of a
    random non-empty stack; both are two tokens (op, value). An odd final token is padding.

    Args:
        num_examples: N. seq_len: T >= 2. vocab_size: V > 1 + 2·num_stacks (the rest are value tokens).
        num_stacks: S. push_prob: in (0, 1). seed: generator seed.

    Returns:
        ``(input_ids [N, T], targets [N, T])`` with the popped value as target at each POP token.

    Raises:
        ValueError: non-positive sizes, T < 2, too small a vocabulary, push_prob outside (0, 1).
    """
    _check_sizes("stack", num_examples, seq_len, vocab_size)
    if not isinstance(num_stacks, int) or num_stacks < 1:
        raise ValueError(f"stack: num_stacks must be a positive int, got {num_stacks!r}")
    first_value = 1 + 2 * num_stacks
    if vocab_size <= first_value or seq_len < 2:
        raise ValueError(
            f"stack: needs seq_len >= 2 and vocab_size > {first_value} for {num_stacks} stacks, "
            f"got {seq_len} and {vocab_size}"
        )
    if not 0.0 < push_prob < 1.0:
        raise ValueError(f"stack: push_prob must be in (0, 1), got {push_prob}")
    rng = np.random.default_rng(seed)
    N, T = num_examples, seq_len
    n_ops = T // 2
    # All random draws up front (vectorised), then a short Python interpreter per row decides what each step
    # does.
    is_push = rng.random((N, n_ops)) < push_prob
    push_stack = rng.integers(0, num_stacks, size=(N, n_ops))
    push_value = rng.integers(first_value, vocab_size, size=(N, n_ops))
    pop_pick = rng.random((N, n_ops))
    ids = np.zeros((N, T), dtype=np.int64)
    targets = np.full((N, T), IGNORE_INDEX, dtype=np.int64)
    for n in range(N):
        stacks: list[list[int]] = [[] for _ in range(num_stacks)]
        non_empty: list[int] = []  # indices of non-empty stacks, in order of first becoming non-empty
        for i in range(n_ops):
            if is_push[n, i] or not non_empty:
                s, v = int(push_stack[n, i]), int(push_value[n, i])
                if not stacks[s]:
                    non_empty.append(s)
                stacks[s].append(v)
                ids[n, 2 * i], ids[n, 2 * i + 1] = 1 + s, v
            else:
                s = non_empty[int(pop_pick[n, i] * len(non_empty))]
                v = stacks[s].pop()
                if not stacks[s]:
                    non_empty.remove(s)
                ids[n, 2 * i], ids[n, 2 * i + 1] = 1 + num_stacks + s, v
                targets[n, 2 * i] = v
    return torch.from_numpy(ids), torch.from_numpy(targets)


def make_task(
    task: str,
    num_examples: int,
    seq_len: int,
    vocab_size: int | None = None,
    seed: int = 0,
    num_kv_pairs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [N, T], targets [N, T])`` of ``task`` (one of TASKS) with its default vocabulary if None.

    ``num_kv_pairs`` applies to MQAR only. Raises ValueError for an unknown task or bad sizes.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are: {', '.join(TASKS)}")
    vocab_size = DEFAULT_VOCAB[task] if vocab_size is None else vocab_size
    if task == "mqar":
        return mqar(num_examples, seq_len, vocab_size, num_kv_pairs, seed)
    if num_kv_pairs is not None:
        raise ValueError(f"num_kv_pairs applies to mqar only, not {task}")
    if task == "palindrome":
        return palindrome(num_examples, seq_len, vocab_size, seed)
    return stack(num_examples, seq_len, vocab_size, seed=seed)


# ---- the model ---------------------------------------------------------------------------------------------


def synthetic_model_config(
    mixer: str, vocab_size: int, seq_len: int, num_layers: int = 2, num_heads: int = 2, head_dim: int = 128
):
    """The paper's synthetic-task model: ``num_layers`` layers of one mixer, ``num_heads`` heads of
    ``head_dim``, dense SwiGLU MLP (no MoE), hidden size num_heads·head_dim.

    "attention" is MLA (NoPE) in every layer, with ``head_dim`` for its no-position q/k part and its values.
    """
    from kimi_linear.config import KimiLinearConfig

    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; mixers are: {', '.join(MIXERS)}")
    hidden = num_heads * head_dim
    return KimiLinearConfig.from_preset(
        "debug",
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        intermediate_size=2 * hidden,
        num_experts=0,
        first_k_dense_replace=num_layers,
        kda_num_heads=num_heads,
        kda_head_dim=head_dim,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        kv_lora_rank=hidden,
        qk_nope_head_dim=head_dim,
        qk_rope_head_dim=head_dim // 2,
        v_head_dim=head_dim,
        mixer="mla" if mixer == "attention" else mixer,
        hybrid_ratio=0,
        model_max_length=max(seq_len, 8),
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_model(mixer: str, vocab_size: int, seq_len: int, seed: int = 0, **sizes) -> torch.nn.Module:
    """A freshly initialised ``KimiLinearForCausalLM`` of ``synthetic_model_config``, seeded."""
    from kimi_linear.model import KimiLinearForCausalLM

    config = synthetic_model_config(mixer, vocab_size, seq_len, **sizes)
    torch.manual_seed(seed)
    return KimiLinearForCausalLM(config)


# ---- training and evaluation -------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    """One synthetic-task run. ``vocab_size=None`` takes the task's default; sizes are validated by
    ``validate``."""

    task: str = "mqar"
    mixer: str = "kda"
    seq_len: int = 256
    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 64
    vocab_size: int | None = None
    num_kv_pairs: int | None = None
    warmup_frac: float = 0.1
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_examples: int = 256
    stop_at: float = 0.99
    max_seconds: float | None = None
    seed: int = 0
    device: str = "cpu"
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 128

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; tasks are: {', '.join(TASKS)}")
        if self.mixer not in MIXERS:
            raise ValueError(f"unknown mixer {self.mixer!r}; mixers are: {', '.join(MIXERS)}")
        for name in (
            "seq_len",
            "steps",
            "batch_size",
            "eval_every",
            "eval_examples",
            "num_layers",
            "num_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr <= 1 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be in (0, 1], got {self.lr!r}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.stop_at <= 1:
            raise ValueError(f"stop_at must be in (0, 1], got {self.stop_at}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0 (or None for no limit), got {self.max_seconds}")
        # Generating one example checks the task's own size constraints with its message.
        make_task(self.task, 1, self.seq_len, self.vocab_size, 0, self.num_kv_pairs)


@dataclass
class SynthResult:
    """What a run produced: final and best answer accuracy, the curve, and how long it took."""

    config: dict
    accuracy: float
    best_accuracy: float
    steps_run: int
    seconds: float
    first_step_seconds: float
    curve: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on vectors (norms, biases), A_log, dt_bias or D."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        (no_decay if p.dim() < 2 or leaf in ("A_log", "dt_bias", "D") or "norm" in name else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine down to 10 % of the peak at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> tuple[float, float]:
    """``(answer accuracy, mean answer loss)`` of ``model`` on the given set; argmax predictions."""
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for i in range(0, input_ids.shape[0], batch_size):
        ids, tgt = input_ids[i : i + batch_size].to(device), targets[i : i + batch_size].to(device)
        with _autocast(device):
            logits = model(ids).logits  # [b, T, V]
        answer = tgt != IGNORE_INDEX
        logits_a = logits[answer].float()  # [n_answers, V]
        correct += int((logits_a.argmax(-1) == tgt[answer]).sum())
        total += int(answer.sum())
        loss_sum += float(F.cross_entropy(logits_a, tgt[answer], reduction="sum"))
    model.train()
    return correct / max(total, 1), loss_sum / max(total, 1)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (the kernels' dtype); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_synthetic(cfg: SynthConfig, log=print) -> SynthResult:
    """Train the paper's small model on one synthetic task and report answer accuracy on a held-out set.

    Batches are generated on the fly, batch i from seed (cfg.seed, i); the model is seeded with cfg.seed.
    Evaluates every ``eval_every`` steps and at the end; stops early once the accuracy reaches ``stop_at``, or
    once training has taken ``max_seconds`` after its first step (which compiles kernels), evaluating there.

    Args:
        cfg: the run (validated here).
        log: called with one line of progress per evaluation (``None`` for silence).

    Returns:
        a ``SynthResult`` (final accuracy, best accuracy, the curve of step/loss/accuracy, wall time).

    Raises:
        ValueError: bad configuration (see ``SynthConfig.validate``) or device.
    """
    cfg.validate()
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise ValueError(f"device {cfg.device!r} is not a device torch knows ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} requested but CUDA is not available")
    vocab = DEFAULT_VOCAB[cfg.task] if cfg.vocab_size is None else cfg.vocab_size
    model = build_model(
        cfg.mixer,
        vocab,
        cfg.seq_len,
        cfg.seed,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
    ).to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg.steps, warmup))
    eval_ids, eval_targets = make_task(
        cfg.task,
        cfg.eval_examples,
        cfg.seq_len,
        vocab,
        seed=cfg.seed + _EVAL_SEED_OFFSET,
        num_kv_pairs=cfg.num_kv_pairs,
    )

    curve: list[dict] = []
    best = 0.0
    start = cap_start = time.perf_counter()
    first_step_seconds = 0.0
    step, running = 0, []
    model.train()
    for step in range(1, cfg.steps + 1):
        batch_seed = int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0])
        ids, targets = make_task(
            cfg.task, cfg.batch_size, cfg.seq_len, vocab, seed=batch_seed, num_kv_pairs=cfg.num_kv_pairs
        )
        ids, targets = ids.to(device), targets.to(device)
        with _autocast(device):
            logits = model(ids).logits  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running.append(float(loss.detach()))
        if step == 1:
            # The first step compiles the kernels for these shapes; the time cap counts from after it.
            first_step_seconds = cap_start = time.perf_counter()
            first_step_seconds -= start
        out_of_time = (
            cfg.max_seconds is not None and step > 1 and time.perf_counter() - cap_start > cfg.max_seconds
        )
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            acc, eval_loss = evaluate(model, eval_ids, eval_targets, cfg.batch_size, device)
            best = max(best, acc)
            point = dict(
                step=step,
                train_loss=sum(running) / len(running),
                eval_loss=eval_loss,
                accuracy=acc,
                seconds=time.perf_counter() - start,
            )
            curve.append(point)
            running = []
            if log:
                log(
                    f"{cfg.task} {cfg.mixer} T={cfg.seq_len} lr={cfg.lr:g} step {step}/{cfg.steps}  "
                    f"train loss {point['train_loss']:.3f}  eval loss {eval_loss:.3f}  accuracy {acc:.3f}  "
                    f"({point['seconds']:.0f}s)"
                )
            if acc >= cfg.stop_at or out_of_time:
                break
    return SynthResult(
        config=asdict(cfg),
        accuracy=curve[-1]["accuracy"],
        best_accuracy=best,
        steps_run=step,
        seconds=time.perf_counter() - start,
        first_step_seconds=first_step_seconds,
        curve=curve,
    )
