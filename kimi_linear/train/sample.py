"""A short sample from a freshly trained model: the end-of-training "does it write Python yet?" check."""

from __future__ import annotations

import torch


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, *, temperature: float = 0.8,
                seed: int = 0) -> str:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens sampled at ``temperature`` (stops at EOS).

    Uses the model's cache: the prompt is prefilled in one forward, then one token per step.
    """
    if not prompt:
        raise ValueError("the prompt must not be empty")
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt)]
    cache = model.allocate_cache(1, len(ids) + max_new_tokens)
    x = torch.tensor([ids], device=model.device)
    new = []
    for _ in range(max_new_tokens):
        logits = model(x, cache=cache).logits[0, -1].float().cpu()
        token = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen))
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        x = torch.tensor([[token]], device=model.device)
    return tokenizer.decode(new)
