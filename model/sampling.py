"""Token generation with a KV cache: greedy, or temperature + top-k + top-p (nucleus, Holtzman et al. 2019)."""
import torch

from .model import KVCache


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """logits: (V,). temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        p, idx = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = p.cumsum(-1) - p >= top_p
        probs = torch.zeros_like(probs).scatter(0, idx, p.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int = 128, stop_ids=(), temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None, on_token=None):
    """Generate up to max_new_tokens after prompt_ids (one sequence). The prompt is run once, then one token per
    step against the KV cache. Stops after a token in stop_ids (not returned). on_token(ids) is called after
    each new token, for streaming. Works on a Transformer or any PEFT wrapper with the same call."""
    cache = KVCache(model.cfg.num_hidden_layers)  # PEFT wrappers expose the base's cfg
    device = next(model.parameters()).device
    x = torch.tensor([prompt_ids], device=device)                       # (1, T)
    out = []
    for _ in range(max_new_tokens):
        logits = model(x, cache=cache)[0, -1]                             # (V,)
        tok = sample_next(logits, temperature, top_k, top_p, generator)
        if tok in stop_ids:
            break
        out.append(tok)
        if on_token is not None:
            on_token(out)
        x = torch.tensor([[tok]], device=device)
    return out
