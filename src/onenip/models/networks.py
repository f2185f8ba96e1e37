"""Reconstruction networks and the refiner (§2, §4), and the anomaly maps they give (§6).

`OneNIP` reconstructs the features of a query image through a normal image prompt: a shared self-attention encoder,
a bidirectional (two-way) decoder whose prompt stream, after reading the query, becomes the reconstruction. `UniAD` is
the prompt-free baseline. `StaticPrompt` is the paper's intermediate step (Table 4a line 1, "unidirectional decoder
with static prompt"): UniAD's decoder with its learned queries replaced by the encoded prompt. All predict features
F_hat of shape (B, C, H, W) for backbone features F; the anomaly map is ||F_hat - F||_2 over channels (Eq. 9), and
the `Refiner` turns |F_hat - F| into a sharper map at full resolution (Eq. 6; §4: two blocks of 3x3 conv + BN +
ReLU + 2x2 transposed conv, a 1x1 conv, then x4 bilinear on the logits).

Shapes: B batch, C backbone channels (272 for efficientnet_b4), D hidden size, H = W = input/16, L = H*W tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onenip.config import ModelConfig
from onenip.models.transformer import (
    Attention,
    Encoder,
    PositionEmbedding2d,
    QueryDecoder,
    TwoWayDecoder,
    neighbor_allowed,
)


def bilinear_weights(n: int, size: int, like: Tensor) -> Tensor:
    """The (size, n) matrix of 1-D linear interpolation with align_corners=True: row i holds the weights of output
    position i over the n inputs (two non-zero, summing to 1), in `like`'s dtype and device."""
    pos = torch.arange(size, device=like.device, dtype=torch.float32) * ((n - 1) / max(size - 1, 1))
    lo = pos.floor().clamp(max=max(n - 2, 0))
    frac = (pos - lo)[:, None]
    idx = torch.arange(n, device=like.device, dtype=torch.float32)[None, :]
    weights = (idx == lo[:, None]) * (1.0 - frac) + (idx == lo[:, None] + 1.0) * frac
    return weights.to(like.dtype)


def upsample(x: Tensor, size: int) -> Tensor:
    """(B, C, H, W) -> (B, C, size, size), bilinear with align_corners=True, as the reference's UpsamplingBilinear2d.

    Bilinear interpolation is separable, so it is written as two matrix products, A_h @ x @ A_w^T
    (`bilinear_weights`): the same values as F.interpolate up to float rounding, and much faster in the exported CPU
    runtimes, whose interpolation kernels vectorise over channels while a map has one (`benchmarks/cpu_speed.py
    --profile` shows the per-layer times)."""
    rows = bilinear_weights(x.shape[-2], size, x)  # (size, H)
    cols = rows if x.shape[-1] == x.shape[-2] else bilinear_weights(x.shape[-1], size, x)  # (size, W)
    return rows @ x @ cols.transpose(0, 1)


class Refiner(nn.Module):
    """|F_hat - F| (B, C, H, W) -> refined anomaly logits (B, 1, 4H, 4W) (§4)."""

    def __init__(self, in_channels: int, channels: int = 128) -> None:
        super().__init__()

        def block(cin: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(channels, channels, 2, stride=2),
            )

        self.block1 = block(in_channels)
        self.block2 = block(channels)
        self.predict = nn.Conv2d(channels, 1, 1)

    def forward(self, error: Tensor) -> Tensor:
        return self.predict(self.block2(self.block1(error)))


def xavier_init(module: nn.Module) -> None:
    """The reference initialiser: xavier-uniform weights and zero biases for Linear/Conv/ConvTranspose, except the
    attention q/k/v projections (which keep the nn.MultiheadAttention init, see `Attention`)."""
    keep = set()
    for m in module.modules():
        if isinstance(m, Attention):
            keep.update({id(m.q_proj), id(m.k_proj), id(m.v_proj)})
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) and id(m) not in keep:
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ReconstructionNet(nn.Module):
    """What OneNIP and UniAD share: projections, positional embedding, neighbour mask, encoder, jitter, refiner."""

    uses_prompt = False

    def __init__(self, cfg: ModelConfig, in_channels: int, grid: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_channels, self.grid = in_channels, grid
        d = cfg.hidden_dim
        self.input_proj = nn.Linear(in_channels, d)
        self.output_proj = nn.Linear(d, in_channels)
        self.pos = PositionEmbedding2d(grid, grid, d)
        self.encoder = Encoder(cfg.encoder_layers, d, cfg.heads, cfg.ffn_dim, cfg.dropout)
        self.refiner = Refiner(in_channels, cfg.refiner_channels) if cfg.refiner else None
        neighbor = cfg.neighbor_size or grid // 2
        if cfg.neighbor_mask and (2 * (neighbor // 2) + 1) ** 2 >= grid * grid and grid > 1:
            raise ValueError(f"model.neighbor_size {neighbor} masks the whole {grid}x{grid} feature grid")
        allowed = neighbor_allowed(grid, grid, neighbor) if cfg.neighbor_mask else None
        self.register_buffer("allowed", allowed, persistent=False)  # (L, L) bool or None

    def jitter(self, feats: Tensor) -> Tensor:
        """Feature jitter in training (§2.2 step 4): with probability jitter_prob, f += eps * ||f||_2 / C * scale,
        eps ~ N(0, I). The coin is a tensor on the features' device, so that the host never waits for it (and a
        compiled graph does not break on it)."""
        cfg = self.cfg
        if not self.training or cfg.jitter_scale <= 0:
            return feats
        apply = (torch.rand((), device=feats.device) <= cfg.jitter_prob).to(feats.dtype)  # () 1 or 0
        norm = feats.norm(dim=1, keepdim=True)  # (B, 1, H, W)
        return feats + torch.randn_like(feats) * norm / feats.shape[1] * (cfg.jitter_scale * apply)

    def tokens(self, feats: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, D)."""
        return self.input_proj(feats.flatten(2).transpose(1, 2))

    def untokens(self, tokens: Tensor) -> Tensor:
        """(B, L, D) -> (B, C, H, W)."""
        b = tokens.shape[0]
        return self.output_proj(tokens).transpose(1, 2).reshape(b, self.in_channels, self.grid, self.grid)

    def reconstruct(self, feats: Tensor, prompt_feats: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, feats: Tensor, prompt_feats: Tensor | None = None, size: int = 0) -> tuple[Tensor, Tensor | None]:
        """Training forward (what DistributedDataParallel wraps): F_hat (B, C, H, W) and, with a refiner and size > 0,
        the refiner's logits (B, 1, size, size)."""
        rec = self.reconstruct(feats, prompt_feats)
        logits = self.refine(rec, feats, size) if self.refiner is not None and size > 0 else None
        return rec, logits

    def refine(self, rec: Tensor, feats: Tensor, size: int) -> Tensor:
        """Refiner logits at the input resolution `size` from |F_hat - F| (B, C, H, W) -> (B, 1, size, size)."""
        assert self.refiner is not None
        return upsample(self.refiner((rec - feats).abs()), size)


class OneNIP(ReconstructionNet):
    """Prompted reconstruction (§2.2): the prompt stream of the two-way decoder, having read the query, becomes F_hat."""

    uses_prompt = True

    def __init__(self, cfg: ModelConfig, in_channels: int, grid: int) -> None:
        super().__init__(cfg, in_channels, grid)
        self.decoder = self.build_decoder(cfg, grid)
        xavier_init(self)

    def build_decoder(self, cfg: ModelConfig, grid: int) -> nn.Module:
        return TwoWayDecoder(cfg.decoder_layers, cfg.hidden_dim, cfg.heads, cfg.ffn_dim, cfg.dropout, cfg.v1_decoder_bug)

    def reconstruct(self, feats: Tensor, prompt_feats: Tensor | None = None) -> Tensor:
        """feats (B, C, H, W), prompt_feats (Bp, C, H, W) with B a multiple of Bp -> F_hat (B, C, H, W).

        With B = k * Bp, query i takes prompt i mod Bp (in training: [normal; synthetic] share their prompt).
        """
        if prompt_feats is None:
            raise ValueError("OneNIP needs prompt features")
        b, bp = feats.shape[0], prompt_feats.shape[0]
        if b % bp:
            raise ValueError(f"query batch {b} is not a multiple of prompt batch {bp}")
        encoded = self.encode(self.jitter(torch.cat([feats, prompt_feats])))  # (B + Bp, L, D); one jitter draw
        return self.decode(encoded[:b], encoded[b:])

    def encode(self, feats: Tensor) -> Tensor:
        """The shared self-attention encoder (§2.2 step 7, §2.4), image by image: (B, C, H, W) -> (B, L, D). A deployed model
        encodes its prompt pool once (the prompt is fixed) and decodes every query against the stored result."""
        return self.encoder(self.tokens(feats), self.pos(), self.allowed)

    def decode(self, x: Tensor, p: Tensor) -> Tensor:
        """Encoded query x (B, L, D) and prompt p (Bp, L, D), B a multiple of Bp -> F_hat (B, C, H, W) (§2.4)."""
        b, bp = x.shape[0], p.shape[0]
        if b != bp:
            p = p.repeat(b // bp, 1, 1)  # (B, L, D): query i takes prompt i mod Bp
        return self.untokens(self.run_decoder(x, p))

    def run_decoder(self, x: Tensor, p: Tensor) -> Tensor:
        """Encoded query x and prompt p, both (B, L, D) -> the reconstruction's tokens (B, L, D): the prompt stream."""
        return self.decoder(p, x, self.pos(), self.allowed)


class StaticPrompt(OneNIP):
    """Unidirectional decoder with static prompt (the paper's §3.1 and Table 4a line 1; method §2.6): the shared encoder encodes
    query and prompt as OneNIP does; UniAD's layer-wise query decoder then reads the query's encoding, with the encoded
    prompt in place of every layer's learned query embedding. The prompt is not updated by the decoder (static); the
    decoder's output stream becomes F_hat."""

    def build_decoder(self, cfg: ModelConfig, grid: int) -> nn.Module:
        return QueryDecoder(cfg.decoder_layers, grid * grid, cfg.hidden_dim, cfg.heads, cfg.ffn_dim, cfg.dropout,
                            learned=False)

    def run_decoder(self, x: Tensor, p: Tensor) -> Tensor:
        """Encoded query x and prompt p, both (B, L, D) -> (B, L, D): the query decoder reads x with p as its queries."""
        return self.decoder(x, self.pos(), self.allowed, query=p)


class UniAD(ReconstructionNet):
    """The UniAD baseline (§2.5): encoder, then a decoder of learned per-layer queries; no prompt."""

    def __init__(self, cfg: ModelConfig, in_channels: int, grid: int) -> None:
        super().__init__(cfg, in_channels, grid)
        self.decoder = QueryDecoder(cfg.decoder_layers, grid * grid, cfg.hidden_dim, cfg.heads, cfg.ffn_dim, cfg.dropout)
        xavier_init(self)

    def reconstruct(self, feats: Tensor, prompt_feats: Tensor | None = None) -> Tensor:
        pos = self.pos()
        memory = self.encoder(self.tokens(self.jitter(feats)), pos, self.allowed)
        return self.untokens(self.decoder(memory, pos, self.allowed))


def build_network(cfg: ModelConfig, in_channels: int, input_size: int) -> ReconstructionNet:
    grid = input_size // 16
    if cfg.arch == "onenip":
        return OneNIP(cfg, in_channels, grid)
    if cfg.arch == "uniad":
        return UniAD(cfg, in_channels, grid)
    if cfg.arch == "static-prompt":
        return StaticPrompt(cfg, in_channels, grid)
    raise ValueError(f"model.arch: unknown architecture {cfg.arch!r}")
