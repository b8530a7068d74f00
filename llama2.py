"""Llama 2 from scratch, in one file (torch + einops only).

Llama 2 (Touvron et al., 2023) is GPT-2's decoder-only transformer (see gpt2.py) with these changes:
no position embedding, instead rotary position embeddings (RoPE) turn the queries and keys by an angle
that grows with the position; RMSNorm instead of LayerNorm; a SwiGLU MLP instead of GELU; no biases
and no dropout; an output head of its own (untied); and in the 70B model grouped-query attention, where
8 key/value heads are shared by the 64 query heads. The big presets create their weights in bfloat16.

    python llama2.py    # parameter count of every preset, then a toy model run once
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat


@dataclass
class Config:
    vocab_size: int = 32000      # SentencePiece BPE of Llama 1 and 2
    context_length: int = 4096   # longest sequence seen in training (RoPE itself has no limit)
    d_model: int = 4096          # width of the residual stream
    n_layers: int = 32           # transformer blocks
    n_heads: int = 32            # query heads (d_model / n_heads = 128 each)
    n_kv_heads: int = 32         # key/value heads; fewer than n_heads = grouped-query attention
    d_ff: int = 11008            # hidden width of the SwiGLU MLP (about 8/3 d_model)
    norm_eps: float = 1e-5       # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base: the slowest pair turns once every ~2*pi*theta positions
    tie_weights: bool = False    # output head shares the token embedding's weight
    embedding_std: float = 0.02  # init std of the token embedding
    flash: bool = False          # F.scaled_dot_product_attention instead of the einsum reference
    weight_dtype: str = "bfloat16"  # dtype the weights are created in: float32 or bfloat16


PRESETS = {
    "llama2-7b":  dict(),                                                                # 6.7B
    "llama2-13b": dict(d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40, d_ff=13824),  # 13B
    "llama2-70b": dict(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672),   # 69B, GQA
    # small enough to train on The Verdict with GPT-2's tokenizer (train.py)
    "toy":        dict(vocab_size=50257, context_length=256, d_model=384, n_layers=6,
                       n_heads=6, n_kv_heads=6, d_ff=1024, weight_dtype="float32"),  # 49M
}


class RMSNorm(nn.Module):
    """Scale each position's vector to unit root-mean-square, then by a learned weight (no shift)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # in float32 as Meta's and Hugging Face's code do: bf16 is too coarse for this
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, preallocated and filled in place while decoding."""

    def __init__(self, batch_size, max_len, n_heads, d_head, dtype, device):
        super().__init__()
        # buffers, so that .to() moves them and torch.compile treats them as model state; not saved
        shape = (batch_size, n_heads, max_len, d_head)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos, k, v):
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (b, h, s, d): all positions up to now


def rope_frequencies(cfg, device=None):
    """Angle per position of each pair of dimensions in a head: theta^(-2i / d_head), i < d_head / 2."""
    d_head = cfg.d_model // cfg.n_heads
    return 1.0 / cfg.rope_theta ** (torch.arange(0, d_head, 2, device=device).float() / d_head)


def rotate(x, cos, sin):
    """RoPE: turn each pair of dimensions (i, i + d_head/2) of x (b, h, t, d) by its position's angle.

    Meta's code pairs neighbouring dimensions (2i, 2i + 1); Hugging Face permuted the rows of wq and wk
    when converting the checkpoints so that pairing the two halves gives the same result. We pair the
    halves too, so Hugging Face weights load as they are.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention with RoPE; n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.d_head = cfg.d_model // cfg.n_heads
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.d_head, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.d_head, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.d_head, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.d_head, cfg.d_model, bias=False)
        self.flash = cfg.flash
        self.cache = None  # a KVCache while generating, see Transformer.setup_cache

    def forward(self, x, mask, cos, sin, start_pos=0, use_cache=False):
        q = rearrange(self.wq(x), 'b t (h d) -> b h t d', h=self.n_heads)
        k = rearrange(self.wk(x), 'b s (g d) -> b g s d', g=self.n_kv_heads)
        v = rearrange(self.wv(x), 'b s (g d) -> b g s d', g=self.n_kv_heads)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # keys are cached already turned
        if use_cache:
            k, v = self.cache.update(start_pos, k, v)
        # each key/value head serves n_heads / n_kv_heads query heads (a no-op without GQA); repeating
        # after the cache keeps the cache n_heads / n_kv_heads times smaller
        k = repeat(k, 'b g s d -> b (g r) s d', r=self.n_heads // self.n_kv_heads)
        v = repeat(v, 'b g s d -> b (g r) s d', r=self.n_heads // self.n_kv_heads)
        if self.flash:  # fused kernel, same maths; is_causal lets it skip the masked half
            causal = q.shape[2] == k.shape[2]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask,
                                                 is_causal=causal)
        else:
            scores = torch.einsum('bhtd, bhsd -> bhts', q, k) / math.sqrt(self.d_head)
            scores = scores.masked_fill(~mask, float('-inf'))
            weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # float32 softmax, for bf16
            out = torch.einsum('bhts, bhsd -> bhtd', weights, v)
        return self.wo(rearrange(out, 'b h t d -> b t (h d)'))


class MLP(nn.Module):
    """SwiGLU feed-forward: a SiLU gate multiplies a second projection, then project back."""

    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, cos, sin, start_pos=0, use_cache=False):
        x = x + self.attn(self.attn_norm(x), mask, cos, sin, start_pos, use_cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Llama 2: token embedding -> n_layers blocks (RoPE inside attention) -> final norm -> logits."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # Meta's code only runs trained weights; for training from scratch we initialise as gpt2.py
        # does, scaling the projections that add into the residual stream by 1/sqrt(2 * n_layers).
        for block in self.blocks:
            for w in (block.attn.wo.weight, block.mlp.down.weight):
                nn.init.normal_(w, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_weights:
            self.lm_head.weight = self.token_embedding.weight
        self.to(getattr(torch, cfg.weight_dtype))
        # No buffers: forward computes the RoPE angles it needs, so a meta-device model is complete once loaded.

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.embedding_std)

    def setup_cache(self, batch_size, max_len):
        """Give every attention layer a KV cache for generation; one of the right size is reused
        (forward reads only the positions it has written, and new buffers would recompile a compiled model)."""
        p = self.lm_head.weight
        for block in self.blocks:
            a = block.attn
            if a.cache is None or a.cache.k.shape != (batch_size, a.n_kv_heads, max_len, a.d_head):
                a.cache = KVCache(batch_size, max_len, a.n_kv_heads, a.d_head, p.dtype, p.device)

    def forward(self, idx, start_pos=0, use_cache=False, last_only=False):
        """idx: (b, t) token ids -> logits (b, t, vocab_size); with last_only, of the last position only.

        idx's first token is at position start_pos. With use_cache (after setup_cache), its keys and
        values are written into the cache there, and attention also sees the cached earlier positions.
        """
        t = idx.shape[1]
        past = start_pos if use_cache else 0  # earlier positions whose keys come from the cache
        positions = torch.arange(start_pos, start_pos + t, device=idx.device)
        x = self.token_embedding(idx)  # (b, t, d_model)
        # RoPE angles of these positions, once for all blocks; the two halves of a head share them
        angles = positions[:, None].float() * rope_frequencies(self.cfg, idx.device)  # (t, d/2)
        angles = torch.cat((angles, angles), dim=-1)  # (t, d)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        # mask[i, j]: query i (idx's i-th token) may look at key j (the past cached ones, then idx's)
        mask = torch.ones(t, past + t, dtype=torch.bool, device=idx.device).tril(diagonal=past)
        for block in self.blocks:
            x = block(x, mask, cos, sin, start_pos, use_cache)
        if last_only:
            x = x[:, -1:]  # (b, 1, d_model)
        return self.lm_head(self.final_norm(x))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())  # a tied weight is counted once


if __name__ == "__main__":
    for name, overrides in PRESETS.items():
        with torch.device('meta'):  # shapes only: no memory is allocated for the weights
            model = Transformer(Config(**overrides))
        print(f"{name:12s} {count_parameters(model):>15,} parameters")
    torch.manual_seed(0)
    model = Transformer(Config(**PRESETS["toy"])).eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 8))
    print("toy: logits", tuple(model(idx).shape), "for token ids", tuple(idx.shape))
