"""A tiny decoder-only pre-LN transformer (GPT-2 layout) for the instability suite, with optional qk-layernorm
(Dehghani et al. 2023; Wortsman et al. 2023, arXiv 2309.14322: it removes the attention-logit growth behind
loss spikes at high learning rates), and the synthetic language it learns (:func:`synthetic_language`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyGPT", "synthetic_language"]


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head = dim // heads
        # qk-layernorm: a LayerNorm over each head's queries and keys bounds the attention logits
        self.q_norm = nn.LayerNorm(head) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = logits.masked_fill(mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    """Pre-LN: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (two residual merges per block)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, qk_norm)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token and position embeddings, ``depth`` pre-LN blocks, a final LayerNorm and an untied output layer."""

    def __init__(self, vocab: int = 64, context: int = 32, dim: int = 64, depth: int = 2, heads: int = 4,
                 qk_norm: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, qk_norm) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        # GPT-2's init for the linear layers: N(0, 0.02), residual projections / sqrt(2 depth); the embeddings
        # keep torch's N(0, 1), so the first LayerNorm does not amplify the branch's gradient 50x at the start
        for name, p in self.named_parameters():
            if p.dim() == 2 and not name.startswith(("tok.", "pos.")):
                std = 0.02 / math.sqrt(2 * depth) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits, ``(batch, time, vocab)``, for token ids ``idx`` of shape ``(batch, time)``."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy over ``idx`` (batch, context + 1)."""
        logits = self(idx[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def synthetic_language(n: int, context: int = 32, vocab: int = 64, seed: int = 0, grammar: int = 0,
                       branching: int = 4) -> torch.Tensor:
    """``n`` sequences of ``context + 1`` tokens with learnable structure: the first half follows a random
    first-order Markov chain (each token has ``branching`` likely successors; chain ``grammar``), the second
    half repeats the first (a copy only attention can learn). Entropy per token: about log(branching) in the
    first half, ~0 in the second; a model that knows nothing pays log(vocab)."""
    g = torch.Generator().manual_seed(1000 + grammar)
    succ = torch.stack([torch.randperm(vocab, generator=g)[:branching] for _ in range(vocab)])  # vocab x branching
    gen = torch.Generator().manual_seed(seed)
    half = (context + 2) // 2
    seq = torch.empty(n, half, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for t in range(1, half):
        pick = torch.randint(0, branching, (n,), generator=gen)
        seq[:, t] = succ[seq[:, t - 1], pick]
    return torch.cat([seq, seq], dim=1)[:, : context + 1]
