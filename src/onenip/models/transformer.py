"""Transformer blocks of the reconstruction networks (§2.3, §2.4, §2.5).

Batch-first token tensors (B, L, D) with L = H*W tokens in row-major order. Positional embeddings are added to queries
and keys, never to values. Every block is post-norm (DETR style, as the reference code). The neighbour mask forbids each
token to attend to its own neighbourhood (UniAD's neighbour-masked attention): it is passed as `allowed`, a (L, L) bool
tensor that is True where attention is permitted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def neighbor_allowed(h: int, w: int, neighbor: int, device: torch.device | None = None) -> Tensor:
    """(h*w, h*w) bool: False where key (h2, w2) is within +-neighbor//2 of query (h1, w1) in both axes (§2.3)."""
    r = neighbor // 2
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    near = ((ys[:, None] - ys[None, :]).abs() <= r) & ((xs[:, None] - xs[None, :]).abs() <= r)
    return ~near


class PositionEmbedding2d(nn.Module):
    """Learned 2-D positional embedding: token (y, x) gets concat(col[x], row[y]) (§2.3), each D/2 wide, U[0,1) init."""

    def __init__(self, h: int, w: int, dim: int) -> None:
        super().__init__()
        self.h, self.w = h, w
        self.row = nn.Embedding(h, dim // 2)
        self.col = nn.Embedding(w, dim // 2)
        nn.init.uniform_(self.row.weight)
        nn.init.uniform_(self.col.weight)

    def forward(self) -> Tensor:
        """-> (1, h*w, dim)."""
        col = self.col.weight[None, :, :].expand(self.h, self.w, -1)  # (h, w, D/2)
        row = self.row.weight[:, None, :].expand(self.h, self.w, -1)  # (h, w, D/2)
        return torch.cat([col, row], dim=-1).flatten(0, 1)[None]  # (1, L, D)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (the layout of SAM's `Attention`, without downsampling).

    Initialised as the reference's `nn.MultiheadAttention`: q/k/v weights drawn from the xavier-uniform bound of the
    stacked (3D, D) in-projection, zero biases; the output projection xavier-uniform (by the model's initialiser).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        bound = math.sqrt(6.0 / (dim + 3 * dim))
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(lin.bias)

    def _split(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, heads, N, D/heads)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None) -> Tensor:
        """q (B, Nq, D), k and v (B, Nk, D), allowed (Nq, Nk) bool or None -> (B, Nq, D)."""
        out = F.scaled_dot_product_attention(
            self._split(self.q_proj(q)),
            self._split(self.k_proj(k)),
            self._split(self.v_proj(v)),
            attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, heads, Nq, D/heads)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """lin2(drop(relu(lin1(x)))); the decoder's MLP has no inner dropout (inner_dropout=0)."""

    def __init__(self, dim: int, hidden: int, inner_dropout: float) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(inner_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.drop(F.relu(self.lin1(x))))


class EncoderLayer(nn.Module):
    """x <- LN1(x + Drop(SelfAttn(x+pos, x+pos, x))); x <- LN2(x + Drop(FFN(x))) (§2.4)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, allowed: Tensor | None) -> Tensor:
        qk = x + pos
        x = self.norm1(x + self.drop1(self.attn(qk, qk, x, allowed)))
        return self.norm2(x + self.drop2(self.ffn(x)))


class Encoder(nn.Module):
    """Self-attention encoder shared by image and prompt: tokens only attend within their own image (§2.2 step 7)."""

    def __init__(self, layers: int, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn_dim, dropout) for _ in range(layers))

    def forward(self, x: Tensor, pos: Tensor, allowed: Tensor | None) -> Tensor:
        for layer in self.layers:
            x = layer(x, pos, allowed)
        return x


class TwoWayLayer(nn.Module):
    """Bidirectional decoder layer of OneNIP (§2.4, Eq. 3): no self-attention, three norms.

    1. prompt -> image cross-attention: P <- LN1(P + Drop(Attn(P+pos, X+pos, X)))
    2. MLP on the prompt stream:       P <- LN2(P + Drop(MLP(P)))
    3. image -> prompt cross-attention: X <- LN3(X + Drop(Attn(X+pos, P+pos, P)))   (with the updated P)
    With `v1_bug` step 3 adds the MLP output instead of the attention (the authors' first release).
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, v1_bug: bool = False) -> None:
        super().__init__()
        self.prompt_to_image = Attention(dim, heads, dropout)
        self.mlp = FeedForward(dim, ffn_dim, 0.0)
        self.image_to_prompt = Attention(dim, heads, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.v1_bug = v1_bug

    def forward(self, p: Tensor, x: Tensor, pos: Tensor, allowed: Tensor | None) -> tuple[Tensor, Tensor]:
        """p (B, L, D) prompt stream, x (B, L, D) image stream -> updated (p, x)."""
        p = self.norm1(p + self.drop1(self.prompt_to_image(p + pos, x + pos, x, allowed)))
        mlp = self.mlp(p)
        p = self.norm2(p + self.drop2(mlp))
        if self.v1_bug:
            x = self.norm3(x + self.drop3(mlp))
        else:
            x = self.norm3(x + self.drop3(self.image_to_prompt(x + pos, p + pos, p, allowed)))
        return p, x


class TwoWayDecoder(nn.Module):
    """Stack of TwoWayLayers, then an unmasked prompt -> image attention and LayerNorm; returns the prompt stream."""

    def __init__(self, layers: int, dim: int, heads: int, ffn_dim: int, dropout: float, v1_bug: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayLayer(dim, heads, ffn_dim, dropout, v1_bug) for _ in range(layers))
        self.final_attn = Attention(dim, heads, dropout)
        self.final_drop = nn.Dropout(dropout)
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, p: Tensor, x: Tensor, pos: Tensor, allowed: Tensor | None) -> Tensor:
        for layer in self.layers:
            p, x = layer(p, x, pos, allowed)
        p = p + self.final_drop(self.final_attn(p + pos, x + pos, x))  # no neighbour mask here (§2.4)
        return self.final_norm(p)


class QueryDecoderLayer(nn.Module):
    """UniAD decoder layer (§2.5): a query per position reads the encoder memory, then the previous output.

    The query is learned (UniAD's layer-wise query embedding) or, with `learned=False`, given: the encoded prompt of
    the paper's "unidirectional decoder with static prompt" (Table 4a line 1), which replaces the learned embedding and
    is never updated by the decoder.
    """

    def __init__(self, tokens: int, dim: int, heads: int, ffn_dim: int, dropout: float, learned: bool = True) -> None:
        super().__init__()
        # N(0, 1) init, untouched by the xavier initialiser
        self.query = nn.Embedding(tokens, dim) if learned else None
        self.attn_memory = Attention(dim, heads, dropout)
        self.attn_previous = Attention(dim, heads, dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, memory: Tensor, previous: Tensor, pos: Tensor, allowed: Tensor | None,
                query: Tensor | None = None) -> Tensor:
        """memory, previous (B, L, D); query (B, L, D) when not learned -> (B, L, D)."""
        if self.query is not None:
            t = self.query.weight[None].expand(memory.shape[0], -1, -1)  # (B, L, D)
        elif query is None:
            raise ValueError("this decoder layer reads a given query (the encoded prompt)")
        else:
            t = query
        t = self.norm1(t + self.drop1(self.attn_memory(t + pos, memory + pos, memory, allowed)))
        t = self.norm2(t + self.drop2(self.attn_previous(t + pos, previous + pos, previous, allowed)))
        return self.norm3(t + self.drop3(self.ffn(t)))


class QueryDecoder(nn.Module):
    """Stack of QueryDecoderLayers (UniAD's layer-wise query decoder); the first layer's "previous" is the memory."""

    def __init__(self, layers: int, tokens: int, dim: int, heads: int, ffn_dim: int, dropout: float,
                 learned: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(QueryDecoderLayer(tokens, dim, heads, ffn_dim, dropout, learned)
                                    for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, memory: Tensor, pos: Tensor, allowed: Tensor | None, query: Tensor | None = None) -> Tensor:
        """memory (B, L, D), query (B, L, D) or None (learned queries) -> (B, L, D)."""
        out = memory
        for layer in self.layers:
            out = layer(memory, out, pos, allowed, query)
        return self.final_norm(out)
