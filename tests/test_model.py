"""Tests of onenip.transformer and onenip.model: sizes, the neighbour mask, the positional embedding, prompted
reconstruction, feature jitter, the v1 decoder bug, UniAD, the refiner, the anomaly maps and the initialiser
(method notes §2, §4, §6)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onenip.config import ModelConfig
from onenip.models.networks import OneNIP, Refiner, StaticPrompt, UniAD, build_network, xavier_init
from onenip.models.scoring import anomaly_maps
from onenip.models.transformer import (
    Attention,
    EncoderLayer,
    PositionEmbedding2d,
    QueryDecoder,
    TwoWayDecoder,
    TwoWayLayer,
    neighbor_allowed,
)

# A small network: 64 px input -> 4x4 grid, neighbour 2 -> 3x3 windows (9 of 16 tokens forbidden per query).
C, SIZE, GRID = 16, 64, 4
SMALL = dict(hidden_dim=32, heads=4, encoder_layers=2, decoder_layers=2, ffn_dim=64, refiner_channels=8)


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, **kw})


def small_net(arch: str = "onenip", seed: int = 0, **kw) -> OneNIP | UniAD:
    torch.manual_seed(seed)
    return build_network(small_cfg(arch=arch, **kw), C, SIZE)


def feats(b: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, C, GRID, GRID, generator=g) * 3


def count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def paper_net() -> OneNIP:
    """The paper's network: 224 px, 272 backbone channels, default ModelConfig."""
    torch.manual_seed(0)
    net = build_network(ModelConfig(), 272, 224)
    assert isinstance(net, OneNIP)
    return net


# --------------------------------------------------------------------------------------------------------------------
# Parameter count (§2.4)
# --------------------------------------------------------------------------------------------------------------------


def test_parameter_count_matches_reference(paper_net: OneNIP) -> None:
    net = paper_net
    assert count(net) == 8_372_625
    assert count(net.encoder) == 3_159_040
    assert count(net.decoder) == 4_477_440  # 4 layers (4,213,760) + final attention and norm (263,680)
    assert count(net.decoder.layers) == 4_213_760
    assert count(net.decoder.final_attn) + count(net.decoder.final_norm) == 263_680
    assert count(net.input_proj) + count(net.output_proj) == 139_792
    assert count(net.pos) == 3_584
    assert count(net.refiner) == 592_769
    assert all(p.requires_grad for p in net.parameters())


def test_positional_embedding_grows_with_input_size() -> None:
    torch.manual_seed(0)
    assert count(build_network(ModelConfig(), 272, 256).pos) == 4_096
    assert count(build_network(ModelConfig(), 272, 320).pos) == 5_120


def test_build_network_arch_and_grid() -> None:
    net = small_net("uniad")
    assert isinstance(net, UniAD) and net.grid == GRID and not net.uses_prompt
    net = small_net("onenip")
    assert isinstance(net, OneNIP) and net.grid == GRID and net.uses_prompt
    net = small_net("static-prompt")
    assert isinstance(net, StaticPrompt) and net.grid == GRID and net.uses_prompt
    with pytest.raises(ValueError, match="arch"):
        build_network(small_cfg(arch="nope"), C, SIZE)


def test_neighbor_size_masking_whole_grid_is_rejected() -> None:
    with pytest.raises(ValueError, match="neighbor_size"):
        build_network(small_cfg(neighbor_size=8), C, SIZE)  # 9x9 window on a 4x4 grid: every key forbidden


# --------------------------------------------------------------------------------------------------------------------
# Neighbour mask (§2.3)
# --------------------------------------------------------------------------------------------------------------------


def forbidden_window(h: int, w: int, y: int, x: int, r: int) -> set[int]:
    return {yy * w + xx for yy in range(h) for xx in range(w) if abs(yy - y) <= r and abs(xx - x) <= r}


def test_neighbor_allowed_14x14_forbids_clipped_7x7_window() -> None:
    allowed = neighbor_allowed(14, 14, 7)
    assert allowed.shape == (196, 196) and allowed.dtype == torch.bool
    assert torch.equal(allowed, allowed.T)
    assert not allowed.diagonal().any()  # every token is forbidden to attend to itself
    for (y, x), n_forbidden in [((0, 0), 16), ((0, 7), 28), ((7, 0), 28), ((13, 13), 16), ((7, 7), 49), ((6, 8), 49)]:
        row = allowed[y * 14 + x]
        assert int((~row).sum()) == n_forbidden, (y, x)
        forbidden = set(torch.nonzero(~row).flatten().tolist())
        assert forbidden == forbidden_window(14, 14, y, x, 3), (y, x)


def test_neighbor_allowed_16x16_window_is_9x9() -> None:
    allowed = neighbor_allowed(16, 16, 8)
    assert torch.equal(allowed, allowed.T)
    centre = 8 * 16 + 8
    assert int((~allowed[centre]).sum()) == 81
    assert set(torch.nonzero(~allowed[centre]).flatten().tolist()) == forbidden_window(16, 16, 8, 8, 4)
    assert int((~allowed[0]).sum()) == 25  # corner: 5x5


def test_neighbor_allowed_non_square_grid() -> None:
    allowed = neighbor_allowed(3, 5, 2)  # 3 rows, 5 columns, 3x3 windows
    for y in range(3):
        for x in range(5):
            forbidden = set(torch.nonzero(~allowed[y * 5 + x]).flatten().tolist())
            assert forbidden == forbidden_window(3, 5, y, x, 1)


def test_model_uses_window_of_half_the_grid() -> None:
    net = small_net()
    assert torch.equal(net.allowed, neighbor_allowed(GRID, GRID, GRID // 2))
    assert small_net(neighbor_mask=False).allowed is None


# Attention on an 8x8 grid with neighbour 4 (5x5 windows); token i = (3, 3).
G8, I = 8, 3 * 8 + 3
INSIDE = [2 * 8 + 3, 4 * 8 + 4, 1 * 8 + 1, 5 * 8 + 5]  # other tokens in i's window
OUTSIDE = [7 * 8 + 7, 0 * 8 + 6]


def perturbed(x: torch.Tensor, tokens: list[int], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = x.clone()
    y[:, tokens] += torch.randn(x.shape[0], len(tokens), x.shape[2], generator=g) * 3
    return y


def test_attention_ignores_keys_in_the_forbidden_window() -> None:
    torch.manual_seed(0)
    attn = Attention(16, 2, dropout=0.0).eval()
    xavier_init(attn)
    allowed = neighbor_allowed(G8, G8, 4)
    x = torch.randn(2, G8 * G8, 16)
    with torch.no_grad():
        base = attn(x, x, x, allowed)
        kv = perturbed(x, INSIDE)
        inside = attn(x, kv, kv, allowed)
        kv_self = perturbed(x, [I])  # in cross-attention terms, key i is in i's own window too
        self_only = attn(x, kv_self, kv_self, allowed)
        kv_out = perturbed(x, OUTSIDE)
        outside = attn(x, kv_out, kv_out, allowed)
        unmasked = attn(x, kv, kv, None)
    torch.testing.assert_close(inside[:, I], base[:, I], rtol=0, atol=1e-6)
    torch.testing.assert_close(self_only[:, I], base[:, I], rtol=0, atol=1e-6)
    assert (outside[:, I] - base[:, I]).abs().max() > 1e-3
    assert (unmasked[:, I] - base[:, I]).abs().max() > 1e-3  # without the mask the same perturbation shows
    # a token whose window does not hold all the perturbed tokens does see the change: (0,0) may read (4,4)
    assert (inside[:, 0] - base[:, 0]).abs().max() > 1e-3


def test_encoder_layer_token_is_blind_to_its_neighbours() -> None:
    torch.manual_seed(0)
    layer = EncoderLayer(16, 2, 32, dropout=0.1).eval()
    xavier_init(layer)
    allowed = neighbor_allowed(G8, G8, 4)
    pos = torch.rand(1, G8 * G8, 16)
    x = torch.randn(2, G8 * G8, 16)
    with torch.no_grad():
        base = layer(x, pos, allowed)
        inside = layer(perturbed(x, INSIDE), pos, allowed)
        outside = layer(perturbed(x, OUTSIDE), pos, allowed)
    torch.testing.assert_close(inside[:, I], base[:, I], rtol=0, atol=1e-5)
    assert (outside[:, I] - base[:, I]).abs().max() > 1e-3


def test_two_way_layer_prompt_token_is_blind_to_image_window() -> None:
    """Step 1 (prompt -> image) is masked: prompt token i never reads image tokens in its window, i included."""
    torch.manual_seed(0)
    layer = TwoWayLayer(16, 2, 32, dropout=0.1).eval()
    xavier_init(layer)
    allowed = neighbor_allowed(G8, G8, 4)
    pos = torch.rand(1, G8 * G8, 16)
    p, x = torch.randn(2, G8 * G8, 16), torch.randn(2, G8 * G8, 16)
    with torch.no_grad():
        base_p, base_x = layer(p, x, pos, allowed)
        in_p, _ = layer(p, perturbed(x, INSIDE + [I]), pos, allowed)
        out_p, _ = layer(p, perturbed(x, OUTSIDE), pos, allowed)
        # step 3 (image -> prompt) is masked as well: image token i does not read prompt tokens in its window.
        # Perturbing prompt tokens inside the window changes the updated prompt at those tokens and at others
        # whose windows they are in, so only test it through the attention module itself:
        q = x + pos
        k_in = perturbed(base_p, INSIDE + [I]) + pos
        a_base = layer.image_to_prompt(q, base_p + pos, base_p, allowed)
        a_in = layer.image_to_prompt(q, k_in, k_in - pos, allowed)
    torch.testing.assert_close(in_p[:, I], base_p[:, I], rtol=0, atol=1e-5)
    assert (out_p[:, I] - base_p[:, I]).abs().max() > 1e-3
    torch.testing.assert_close(a_in[:, I], a_base[:, I], rtol=0, atol=1e-5)


def test_decoder_final_attention_is_unmasked() -> None:
    """With no two-way layers, the output is LN(P + Attn(P, X)) and must read image token i at prompt token i."""
    torch.manual_seed(0)
    dec = TwoWayDecoder(0, 16, 2, 32, dropout=0.1).eval()
    xavier_init(dec)
    allowed = neighbor_allowed(G8, G8, 4)
    pos = torch.rand(1, G8 * G8, 16)
    p, x = torch.randn(2, G8 * G8, 16), torch.randn(2, G8 * G8, 16)
    with torch.no_grad():
        base = dec(p, x, pos, allowed)
        changed = dec(p, perturbed(x, [I]), pos, allowed)
    assert (changed[:, I] - base[:, I]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------------
# Positional embedding (§2.3)
# --------------------------------------------------------------------------------------------------------------------


def test_position_embedding_layout() -> None:
    torch.manual_seed(0)
    pe = PositionEmbedding2d(3, 5, 8)  # h=3 rows, w=5 columns: a transposed layout would fail
    assert pe.row.weight.shape == (3, 4) and pe.col.weight.shape == (5, 4)
    out = pe()
    assert out.shape == (1, 15, 8)
    for y in range(3):
        for x in range(5):
            expected = torch.cat([pe.col.weight[x], pe.row.weight[y]])
            assert torch.equal(out[0, y * 5 + x], expected), (y, x)


def test_position_embedding_init_uniform_01(paper_net: OneNIP) -> None:
    for w in (paper_net.pos.row.weight.detach(), paper_net.pos.col.weight.detach()):
        assert w.shape == (14, 128)
        assert float(w.min()) >= 0.0 and float(w.max()) < 1.0
        assert 0.4 < float(w.mean()) < 0.6 and float(w.std()) > 0.25  # U[0,1): mean 0.5, std 0.289
    assert paper_net.pos().shape == (1, 196, 256)


# --------------------------------------------------------------------------------------------------------------------
# OneNIP reconstruction (§2.2)
# --------------------------------------------------------------------------------------------------------------------


def test_reconstruct_repeats_prompts_modulo_prompt_batch() -> None:
    net = small_net().eval()
    q = feats(1, 1).repeat(4, 1, 1, 1)  # four identical queries
    prompts = torch.cat([feats(1, 2), feats(1, 3)])  # Bp = 2 different prompts
    with torch.no_grad():
        out = net.reconstruct(q, prompts)
    assert out.shape == (4, C, GRID, GRID) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=1e-5)  # query i and i + Bp share prompt i
    torch.testing.assert_close(out[1], out[3], rtol=0, atol=1e-5)
    assert (out[0] - out[1]).abs().max() > 1e-3  # different prompts, different reconstructions


def test_reconstruct_training_layout_normal_and_synthetic_share_prompt() -> None:
    """[normal; synthetic] (2Bp) with Bp prompts: identical normal and synthetic features give identical outputs."""
    net = small_net().eval()
    normal = feats(3, 4)
    prompts = feats(3, 5)
    with torch.no_grad():
        out = net.reconstruct(torch.cat([normal, normal]), prompts)
        single = net.reconstruct(normal, prompts)
    assert out.shape == (6, C, GRID, GRID)
    torch.testing.assert_close(out[:3], out[3:], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:3], single, rtol=1e-5, atol=1e-5)  # no cross-image interaction


def test_reconstruct_batch_items_are_independent() -> None:
    net = small_net().eval()
    q, p = feats(3, 6), feats(3, 7)
    with torch.no_grad():
        together = net.reconstruct(q, p)
        alone = torch.cat([net.reconstruct(q[i : i + 1], p[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_reconstruct_rejects_bad_prompt_batches() -> None:
    net = small_net().eval()
    with pytest.raises(ValueError, match="multiple"):
        net.reconstruct(feats(3, 1), feats(2, 2))
    with pytest.raises(ValueError, match="prompt"):
        net.reconstruct(feats(2, 1), None)


def test_reconstruction_depends_on_prompt() -> None:
    net = small_net().eval()
    q = feats(2, 1)
    with torch.no_grad():
        a = net.reconstruct(q, feats(2, 2))
        b = net.reconstruct(q, feats(2, 3))
        c = net.reconstruct(feats(2, 4), feats(2, 2))
    assert (a - b).abs().max() > 1e-3
    assert (a - c).abs().max() > 1e-3  # and on the query


def test_eval_is_deterministic_train_is_not() -> None:
    net = small_net()
    q, p = feats(2, 1), feats(2, 2)
    net.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        a = net.reconstruct(q, p)
        torch.manual_seed(2)
        b = net.reconstruct(q, p)
    assert torch.equal(a, b)
    net.train()
    with torch.no_grad():
        torch.manual_seed(1)
        c = net.reconstruct(q, p)
        d = net.reconstruct(q, p)
        torch.manual_seed(1)
        e = net.reconstruct(q, p)
    assert (c - d).abs().max() > 1e-3
    assert torch.equal(c, e)  # training randomness comes from torch's global generator
    assert (c - a).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------------
# Feature jitter (§2.2 step 4)
# --------------------------------------------------------------------------------------------------------------------


def test_without_jitter_and_dropout_train_equals_eval() -> None:
    for arch in ("onenip", "uniad"):
        net = small_net(arch, jitter_scale=0.0, dropout=0.0)
        q, p = feats(4, 1), feats(2, 2)
        with torch.no_grad():
            net.train()
            a = net.reconstruct(q, p)
            net.eval()
            b = net.reconstruct(q, p)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_jitter_only_in_training() -> None:
    net = small_net(dropout=0.0)  # jitter scale 20 (default)
    assert net.cfg.jitter_scale == 20.0
    quiet = small_net(dropout=0.0, jitter_scale=0.0)
    quiet.load_state_dict(net.state_dict())
    q, p = feats(4, 1), feats(2, 2)
    with torch.no_grad():
        net.eval()
        quiet.eval()
        torch.testing.assert_close(net.reconstruct(q, p), quiet.reconstruct(q, p), rtol=0, atol=0)
        net.train()
        torch.manual_seed(0)
        jittered = net.reconstruct(q, p)
    assert (jittered - quiet.reconstruct(q, p)).abs().max() > 1e-3  # dropout is 0: the difference is the jitter
    x = feats(2, 3)
    net.eval()
    assert torch.equal(net.jitter(x), x)


def test_jitter_magnitude() -> None:
    """f += eps * ||f||_2 / C * scale with eps ~ N(0, I): the normalised noise is standard normal."""
    torch.manual_seed(0)
    net = build_network(small_cfg(jitter_scale=20.0), 64, 128).train()  # C = 64, grid 8
    f = torch.rand(8, 64, 8, 8) * 5 + 0.1
    torch.manual_seed(1)
    out = net.jitter(f)
    noise = (out - f) / (f.norm(dim=1, keepdim=True) / 64 * 20.0)
    assert abs(float(noise.mean())) < 0.03
    assert 0.97 < float(noise.std()) < 1.03
    # Each token's noise is scaled by its own norm: rows with a large norm get proportionally more
    f2 = f.clone()
    f2[0] *= 10
    torch.manual_seed(1)
    out2 = net.jitter(f2)
    torch.testing.assert_close((out2 - f2)[0], 10 * (out - f)[0], rtol=1e-4, atol=1e-4)


def test_jitter_prob_zero_disables_jitter() -> None:
    net = build_network(small_cfg(jitter_prob=0.0), C, SIZE).train()
    x = feats(2, 1)
    assert torch.equal(net.jitter(x), x)


# --------------------------------------------------------------------------------------------------------------------
# v1 decoder bug (§2.4)
# --------------------------------------------------------------------------------------------------------------------


def grads_of_image_to_prompt(v1_bug: bool) -> list[torch.Tensor | None]:
    net = small_net(v1_decoder_bug=v1_bug).eval()
    net.reconstruct(feats(4, 1), feats(2, 2)).sum().backward()
    return [p.grad for layer in net.decoder.layers for p in layer.image_to_prompt.parameters()]


def test_v1_bug_leaves_image_to_prompt_without_gradient() -> None:
    grads = grads_of_image_to_prompt(True)
    assert grads and all(g is None or not g.any() for g in grads)


def test_fixed_decoder_trains_image_to_prompt() -> None:
    net = small_net(v1_decoder_bug=False).eval()
    net.reconstruct(feats(4, 1), feats(2, 2)).sum().backward()
    for layer in net.decoder.layers:  # every layer's feature -> prompt attention gets a gradient
        g = layer.image_to_prompt.q_proj.weight.grad
        assert g is not None and g.abs().max() > 0
        g = layer.image_to_prompt.out_proj.weight.grad
        assert g is not None and g.abs().max() > 0


def test_v1_bug_changes_the_output() -> None:
    fixed, buggy = small_net(v1_decoder_bug=False).eval(), small_net(v1_decoder_bug=True).eval()
    buggy.load_state_dict(fixed.state_dict())
    q, p = feats(2, 1), feats(2, 2)
    with torch.no_grad():
        assert (fixed.reconstruct(q, p) - buggy.reconstruct(q, p)).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------------
# UniAD (§2.5)
# --------------------------------------------------------------------------------------------------------------------


def test_uniad_ignores_prompts_and_keeps_shape() -> None:
    net = small_net("uniad").eval()
    q = feats(3, 1)
    with torch.no_grad():
        a = net.reconstruct(q)
        b = net.reconstruct(q, feats(3, 2))
        c = net.reconstruct(q, feats(1, 3))
    assert a.shape == (3, C, GRID, GRID)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_uniad_has_per_layer_learned_queries() -> None:
    net = small_net("uniad")
    assert isinstance(net.decoder, QueryDecoder)
    layers = list(net.decoder.layers)
    assert len(layers) == SMALL["decoder_layers"]
    queries = [layer.query for layer in layers]
    for emb in queries:
        assert isinstance(emb, nn.Embedding) and emb.weight.shape == (GRID * GRID, SMALL["hidden_dim"])
        assert emb.weight.requires_grad
    assert len({id(e.weight) for e in queries}) == len(queries)  # not shared
    assert not torch.equal(queries[0].weight, queries[1].weight)
    # The queries are used: changing one changes the reconstruction
    net.eval()
    q = feats(2, 1)
    with torch.no_grad():
        before = net.reconstruct(q)
        queries[0].weight.add_(1.0)
        after = net.reconstruct(q)
    assert (after - before).abs().max() > 1e-3


def test_uniad_parameter_count_at_224() -> None:
    torch.manual_seed(0)
    net = build_network(ModelConfig(arch="uniad"), 272, 224)
    # decoder layer: 2 attentions (4 * (256*256 + 256) each), FFN (256*1024+1024 + 1024*256+256), 3 LNs, 196x256 queries
    attn = 4 * (256 * 256 + 256)
    layer = 2 * attn + (256 * 1024 + 1024 + 1024 * 256 + 256) + 3 * 512 + 196 * 256
    assert count(net.decoder) == 4 * layer + 512
    assert count(net.encoder) == 3_159_040


# --------------------------------------------------------------------------------------------------------------------
# Unidirectional decoder with static prompt (Table 4a line 1)
# --------------------------------------------------------------------------------------------------------------------


def test_static_prompt_is_uniad_decoder_with_prompt_queries() -> None:
    """Same parameters as UniAD except the learned query embeddings, which the encoded prompt replaces."""
    torch.manual_seed(0)
    static = build_network(ModelConfig(arch="static-prompt"), 272, 224)
    torch.manual_seed(0)
    uniad = build_network(ModelConfig(arch="uniad"), 272, 224)
    assert isinstance(static.decoder, QueryDecoder)
    assert all(layer.query is None for layer in static.decoder.layers)
    assert count(uniad) - count(static) == 4 * 196 * 256  # four layers' learned queries


def test_static_prompt_decoder_reads_the_encoded_prompt_as_its_query() -> None:
    """F_hat = untokens(QueryDecoder(memory=enc(query), query=enc(prompt))), each layer restarting from the prompt."""
    net = small_net("static-prompt", jitter_scale=0.0).eval()
    q, p = feats(3, 1), feats(3, 2)
    with torch.no_grad():
        x, e = net.encode(q), net.encode(p)
        pos = net.pos()
        out = x
        for layer in net.decoder.layers:  # by hand: every layer's query is the same (static) encoded prompt
            t = layer.norm1(e + layer.attn_memory(e + pos, x + pos, x, net.allowed))
            t = layer.norm2(t + layer.attn_previous(t + pos, out + pos, out, net.allowed))
            out = layer.norm3(t + layer.ffn(t))
        want = net.untokens(net.decoder.final_norm(out))
        torch.testing.assert_close(net.reconstruct(q, p), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net.decode(x, e), want, rtol=1e-5, atol=1e-5)
        assert (net.reconstruct(q, feats(3, 3)) - want).abs().max() > 1e-3  # depends on the prompt
        # query i and i + Bp share prompt i
        two = net.reconstruct(torch.cat([q[:2], q[:2]]), p[:2])
        torch.testing.assert_close(two[:2], two[2:], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="prompt"):
        net.reconstruct(q)
    with pytest.raises(ValueError, match="given query"):
        net.decoder(x, pos, net.allowed)


def test_static_prompt_trains_its_encoder_through_the_prompt() -> None:
    net = small_net("static-prompt")
    net.train()
    q, p = feats(2, 1), feats(2, 2)
    p.requires_grad_(True)
    rec = net.reconstruct(q, p)
    (rec - q).pow(2).mean().backward()
    assert p.grad is not None and p.grad.abs().max() > 0
    assert all(param.grad is not None for param in net.decoder.parameters())


# --------------------------------------------------------------------------------------------------------------------
# Refiner (§4)
# --------------------------------------------------------------------------------------------------------------------


def test_refiner_shapes() -> None:
    torch.manual_seed(0)
    ref = Refiner(C, 8).eval()
    out = ref(torch.rand(2, C, 4, 5))
    assert out.shape == (2, 1, 16, 20)
    blocks = [ref.block1, ref.block2]
    for block in blocks:
        kinds = [type(m) for m in block]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ConvTranspose2d]
        assert block[0].kernel_size == (3, 3) and block[3].kernel_size == (2, 2) and block[3].stride == (2, 2)
    assert ref.predict.kernel_size == (1, 1) and ref.predict.out_channels == 1


def test_refine_upsamples_logits_of_the_absolute_error() -> None:
    net = small_net().eval()
    rec, f = feats(2, 1), feats(2, 2)
    with torch.no_grad():
        out = net.refine(rec, f, SIZE)
        logits = net.refiner((rec - f).abs())
        swapped = net.refine(f, rec, SIZE)
    assert out.shape == (2, 1, SIZE, SIZE)
    assert logits.shape == (2, 1, 4 * GRID, 4 * GRID)
    expected = F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, swapped, rtol=1e-5, atol=1e-6)  # |F_hat - F| is symmetric


# --------------------------------------------------------------------------------------------------------------------
# Anomaly maps (§6)
# --------------------------------------------------------------------------------------------------------------------


def test_anomaly_maps() -> None:
    net = small_net().eval()
    q, p = feats(2, 1), feats(2, 2)
    with torch.no_grad():
        rec = net.reconstruct(q, p)
        maps = anomaly_maps(net, q, rec, SIZE)
        err = (rec - q).norm(dim=1, keepdim=True)
        expected = F.interpolate(err, size=(SIZE, SIZE), mode="bilinear", align_corners=True)[:, 0]
        expected_ref = torch.sigmoid(
            F.interpolate(net.refiner((rec - q).abs()), size=(SIZE, SIZE), mode="bilinear", align_corners=True)
        )[:, 0]
    assert maps.rec.shape == (2, SIZE, SIZE) and maps.rec.dtype == torch.float32
    torch.testing.assert_close(maps.rec, expected, rtol=1e-5, atol=1e-5)
    # align_corners=True keeps the corner values of the grid map
    torch.testing.assert_close(maps.rec[:, 0, 0], err[:, 0, 0, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps.rec[:, -1, -1], err[:, 0, -1, -1], rtol=1e-5, atol=1e-5)
    assert maps.ref is not None and maps.ref.shape == (2, SIZE, SIZE)
    assert float(maps.ref.min()) >= 0.0 and float(maps.ref.max()) <= 1.0
    torch.testing.assert_close(maps.ref, expected_ref, rtol=1e-5, atol=1e-5)


def test_anomaly_maps_without_refiner() -> None:
    net = small_net(refiner=False).eval()
    assert net.refiner is None
    with torch.no_grad():
        q = feats(2, 1)
        maps = anomaly_maps(net, q, net.reconstruct(q, feats(2, 2)), SIZE)
    assert maps.ref is None and maps.rec.shape == (2, SIZE, SIZE)


def test_anomaly_maps_uniad() -> None:
    net = small_net("uniad").eval()
    q = feats(2, 1)
    with torch.no_grad():
        maps = anomaly_maps(net, q, net.reconstruct(q), SIZE)
        err = (net.reconstruct(q) - q).norm(dim=1, keepdim=True)
    expected = F.interpolate(err, size=(SIZE, SIZE), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(maps.rec, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Initialisation (§2.4)
# --------------------------------------------------------------------------------------------------------------------


def test_biases_zero_after_construction(paper_net: OneNIP) -> None:
    n = 0
    for name, m in paper_net.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
            assert not m.bias.any(), name
            n += 1
    assert n > 50
    for m in paper_net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()


def test_attention_weight_bounds(paper_net: OneNIP) -> None:
    d = 256
    qkv_bound = math.sqrt(6.0 / (d + 3 * d))
    out_bound = math.sqrt(6.0 / (2 * d))
    attns = [m for m in paper_net.modules() if isinstance(m, Attention)]
    assert len(attns) == 4 + 2 * 4 + 1  # encoder, two per decoder layer, final
    for a in attns:
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            w = lin.weight.abs().max()
            assert w <= qkv_bound and w > 0.95 * qkv_bound  # fills the stacked-in-projection bound
        w = a.out_proj.weight.abs().max()
        assert w <= out_bound and w > 0.95 * out_bound  # xavier of a square 256x256 layer, wider than qkv_bound
    # input/output projections and the FFNs are xavier too
    for lin, fan in [(paper_net.input_proj, 272 + 256), (paper_net.output_proj, 256 + 272),
                     (paper_net.encoder.layers[0].ffn.lin1, 256 + 1024)]:
        bound = math.sqrt(6.0 / fan)
        w = lin.weight.abs().max()
        assert w <= bound and w > 0.95 * bound


def test_xavier_init_function() -> None:
    torch.manual_seed(0)
    attn = Attention(64, 4)
    q_before = attn.q_proj.weight.detach().clone()
    out_before = attn.out_proj.weight.detach().clone()
    lin = nn.Linear(32, 96)
    conv = nn.Conv2d(8, 16, 3)
    convt = nn.ConvTranspose2d(16, 8, 2, stride=2)
    emb = nn.Embedding(10, 8)
    emb_before = emb.weight.detach().clone()
    for m in (lin, conv, convt):
        nn.init.constant_(m.bias, 0.5)
    container = nn.ModuleList([attn, lin, conv, convt, emb])
    xavier_init(container)
    assert torch.equal(attn.q_proj.weight, q_before)  # q/k/v keep the MultiheadAttention-style init
    assert not torch.equal(attn.out_proj.weight, out_before)
    assert torch.equal(emb.weight, emb_before)  # Embeddings are not touched
    for m in (lin, conv, convt, attn.out_proj):
        assert not m.bias.any()
    assert lin.weight.abs().max() <= math.sqrt(6.0 / (32 + 96))
    assert conv.weight.abs().max() <= math.sqrt(6.0 / (8 * 9 + 16 * 9))


def test_config_is_a_dataclass() -> None:
    cfg = ModelConfig()
    assert dataclasses.asdict(cfg)["hidden_dim"] == 256 and cfg.neighbor_size == 0 and cfg.v1_decoder_bug is False
