"""Multi-turn chat on one model cache: ``ChatSession``.

The session keeps the conversation (``messages``) and the model cache — the KDA states and conv tails, the MLA
latents — of every token the model has seen. A turn renders the whole conversation with the tokenizer's chat
template, keeps the cached tokens when they are a prefix of it and prefills only the rest (the new user message
and the template's markers), then decodes the reply token by token until a stop token (``<|im_end|>``, ``[EOS]``,
the generation config's eos ids), ``max_new_tokens``, or an interrupt.

The assistant replies enter the rendered conversation as the very tokens the model generated (not a
re-encoding of their text, which BPE may split differently), so turn k sees exactly the tokens a fresh
``generate()`` would be given for the whole conversation, and its reply is the same. When the template renders
the history differently from what the cache holds (a changed system prompt, a template that rewrites old
turns), the session starts the cache over and prefills the whole conversation.

Uses only the public model API: ``model.allocate_cache(1, max_length)``, ``model.hidden_states(ids, cache=...)``
and ``kimi_linear.generate.decode_step``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kimi_linear.generate import decode_step, sample, validate_sampling

# Placeholders for the generated replies inside the rendered conversation (private-use characters that user
# text cannot carry: they are removed from it).
_REPLY_START, _REPLY_END = "\ue002", "\ue003"


class ContextFullError(ValueError):
    """The conversation no longer fits the session's cache (``max_length`` tokens)."""


@dataclass(frozen=True)
class SamplingSettings:
    """How replies are sampled: temperature 0 = greedy; top_k 0 = off; top_p 1 = off (see ``generate.sample``).

    ``max_new_tokens`` caps each reply; ``seed`` seeds the sampling generator (None: drawn from torch's global
    generator).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None

    def __post_init__(self) -> None:
        validate_sampling(self.temperature, self.top_k, self.top_p)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")

    @classmethod
    def from_generation_config(cls, generation_config: dict, **overrides) -> SamplingSettings:
        """Defaults from a checkpoint's ``generation_config.json``, then ``overrides`` (None values ignored).

        ``do_sample: false`` means greedy; otherwise ``temperature``, ``top_k`` and ``top_p`` are taken when
        present (as vLLM takes them); ``max_new_tokens`` when present.
        """
        values: dict = {}
        gc = generation_config or {}
        if gc.get("do_sample") is not False:
            for key in ("temperature", "top_k", "top_p"):
                if isinstance(gc.get(key), (int, float)) and not isinstance(gc.get(key), bool):
                    values[key] = gc[key]
            if "top_k" in values:
                values["top_k"] = int(values["top_k"])
        if isinstance(gc.get("max_new_tokens"), int):
            values["max_new_tokens"] = gc["max_new_tokens"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class Reply:
    """One assistant turn.

    Attributes:
        text: the reply's text (special tokens dropped).
        token_ids: the generated tokens, without the stop token.
        finish_reason: "stop" (a stop token), "length" (max_new_tokens or the cache is full), "interrupted".
        prefilled: tokens prefilled for this turn (the new part of the conversation only, when the cache was
            kept).
        reused: tokens of the conversation that were already in the cache.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prefilled: int
    reused: int


class ChatSession:
    """A conversation with ``model`` that keeps its cache between turns (see the module docstring).

    Args:
        model: a ``KimiLinearForCausalLM`` (eval mode).
        tokenizer: from ``kimi_linear.tokenizer.load_tokenizer`` (chat template + stop tokens).
        system: optional system prompt (the first message).
        sampling: ``SamplingSettings`` (default greedy, 512 new tokens per reply).
        max_length: tokens the cache holds (default: the model's model_max_length, at most 32768).
        tools: OpenAI-style tool definitions passed to the template.
        stop_token_ids: ids that end a reply (default ``tokenizer.stop_token_ids``).

    Raises:
        ValueError: bad max_length or sampling settings.
    """

    def __init__(
        self,
        model,
        tokenizer,
        system: str | None = None,
        sampling: SamplingSettings | None = None,
        max_length: int | None = None,
        tools: list[dict] | None = None,
        stop_token_ids: list[int] | None = None,
    ):
        model.pack_for_inference()
        config = model.config
        if max_length is None:
            max_length = min(config.model_max_length, 32768)
        if not isinstance(max_length, int) or not (2 <= max_length <= config.model_max_length):
            raise ValueError(
                f"max_length must be an int in [2, model_max_length={config.model_max_length}], got {max_length!r}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling or SamplingSettings()
        self.max_length = max_length
        self.tools = tools
        self.stop_token_ids = set(tokenizer.stop_token_ids if stop_token_ids is None else stop_token_ids)
        self.cache = model.allocate_cache(1, max_length)
        self.cached_ids: list[int] = []  # the tokens whose states the cache holds, in order
        self.system = system
        self.messages: list[dict] = []
        self._replies: dict[int, list[int]] = {}  # index into messages -> generated tokens
        self._generator: random.Random | None = None
        self.reset()

    # ---- conversation --------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and empty the cache."""
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        self._replies = {}
        self._drop_cache()

    def set_system(self, text: str | None) -> None:
        """Set (or with None remove) the system prompt, keeping the conversation; the next turn prefills it anew."""
        self.system = text
        rest = self.messages[1:] if self.messages and self.messages[0]["role"] == "system" else self.messages
        shift = len(self.messages) - len(rest)
        head = [] if text is None else [{"role": "system", "content": text}]
        self.messages = head + rest
        self._replies = {i - shift + len(head): ids for i, ids in self._replies.items()}

    def _drop_cache(self) -> None:
        self.cache.reset()
        self.cached_ids = []

    def conversation_ids(self, add_generation_prompt: bool = True) -> list[int]:
        """The conversation's tokens as the model is given them: the chat template with the generated replies'
        own tokens in place of their text."""
        rendered, inserts = [], {}
        for i, message in enumerate(self.messages):
            if i in self._replies:
                key = f"{_REPLY_START}{i}{_REPLY_END}"
                inserts[key] = self._replies[i]
                message = {**message, "content": key}
            rendered.append(message)
        return self.tokenizer.apply_chat_template(
            rendered, add_generation_prompt=add_generation_prompt, tools=self.tools, token_inserts=inserts
        )

    # ---- one turn ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def send(self, text: str, on_token: Callable[[int], None] | None = None) -> Reply:
        """Add a user message and generate the assistant's reply.

        Args:
            text: the user's message (special-token names in it are text).
            on_token: called with each generated token (not the stop token) as it is produced, for streaming.

        Returns:
            ``Reply``. A KeyboardInterrupt during the turn ends it early with finish_reason "interrupted"; the
            user message and the partial reply stay in the conversation.

        Raises:
            TypeError: text not a str. ContextFullError (a ValueError): the conversation no longer fits
                ``max_length`` (the user message is not kept; ``reset()`` starts over).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        text = text.replace(_REPLY_START, "").replace(_REPLY_END, "")
        self.messages.append({"role": "user", "content": text})
        ids = self.conversation_ids(add_generation_prompt=True)
        if len(ids) >= self.max_length:
            self.messages.pop()
            raise ContextFullError(
                f"the conversation needs {len(ids)} tokens but the cache holds {self.max_length}; /reset to start over"
            )
        n = len(self.cached_ids)
        if n and (n >= len(ids) or ids[:n] != self.cached_ids):
            self._drop_cache()
        reused = len(self.cached_ids)
        new = ids[reused:]
        budget = min(self.sampling.max_new_tokens, self.max_length - len(ids))
        reply: list[int] = []
        finish = "length"
        in_model = False
        try:
            in_model = True
            logits = self._prefill(new)
            self.cached_ids = list(ids)
            in_model = False
            generator = self._sampling_generator()
            s = self.sampling
            while len(reply) < budget:
                token = int(sample(logits, s.temperature, s.top_k, s.top_p, generator)[0])
                if token in self.stop_token_ids:
                    finish = "stop"
                    break
                reply.append(token)
                if on_token is not None:
                    on_token(token)
                if len(reply) == budget:
                    break
                in_model = True
                logits = decode_step(self.model, torch.tensor([token], device=self.model.device), self.cache)
                self.cached_ids.append(token)
                in_model = False
        except KeyboardInterrupt:
            finish = "interrupted"
            if in_model:  # the cache may hold part of a step: start it over next turn
                self._drop_cache()
        self._replies[len(self.messages)] = reply
        self.messages.append({"role": "assistant", "content": self.tokenizer.decode(reply)})
        return Reply(
            text=self.messages[-1]["content"],
            token_ids=reply,
            finish_reason=finish,
            prefilled=len(new),
            reused=reused,
        )

    def _prefill(self, new: list[int]) -> torch.Tensor:
        """Append ``new`` to the cache; the next-token logits ``[1, vocab]`` fp32."""
        ids = torch.tensor([new], dtype=torch.long, device=self.model.device)
        hidden = self.model.hidden_states(ids, cache=self.cache)  # [1, T, D]
        return self.model.lm_head(hidden[:, -1]).float()

    def _sampling_generator(self) -> random.Random | None:
        if self.sampling.temperature == 0:
            return None
        if self._generator is None:
            seed = self.sampling.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            self._generator = random.Random(seed)
        return self._generator
