"""Tests of models/transformer.py against a reference written from the paper's description with plain tensor ops.

The reference spells out where positional encodings go (added to queries and keys at every attention, never to
the values), which norms exist (post-norm layers; pre-norm with a final encoder norm; a final decoder norm that
also normalizes every intermediate output), and how the padding mask hides keys. Everything runs in float64 with
randomized parameters (LayerNorms too), so any deviation shows.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_args
from models.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
    build_transformer,
)

D, HEADS, FFN = 16, 4, 24


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return module


def attention(query, key, value, mha, key_padding_mask=None):
    """Multi-head attention from its definition; sequence-first [L, B, d] like nn.MultiheadAttention."""
    d = query.shape[-1]
    heads = mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.split(d)
    b_q, b_k, b_v = mha.in_proj_bias.split(d)
    out = []
    for b in range(query.shape[1]):
        q = (query[:, b] @ w_q.T + b_q).reshape(-1, heads, d // heads).transpose(0, 1)  # [h, Lq, dh]
        k = (key[:, b] @ w_k.T + b_k).reshape(-1, heads, d // heads).transpose(0, 1)
        v = (value[:, b] @ w_v.T + b_v).reshape(-1, heads, d // heads).transpose(0, 1)
        scores = q @ k.transpose(1, 2) / math.sqrt(d // heads)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[b][None, None, :], float("-inf"))
        mixed = (scores.softmax(-1) @ v).transpose(0, 1).reshape(-1, d)
        out.append(mixed @ mha.out_proj.weight.T + mha.out_proj.bias)
    return torch.stack(out, dim=1)


def norm(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def ffn(x, layer):
    return layer.linear2(F.relu(layer.linear1(x)))


def ref_encoder_layer(layer, src, mask, pos):
    if layer.normalize_before:
        x = norm(src, layer.norm1)
        src = src + attention(x + pos, x + pos, x, layer.self_attn, mask)
        return src + ffn(norm(src, layer.norm2), layer)
    src = norm(src + attention(src + pos, src + pos, src, layer.self_attn, mask), layer.norm1)
    return norm(src + ffn(src, layer), layer.norm2)


def ref_decoder_layer(layer, tgt, memory, mask, pos, query_pos):
    if layer.normalize_before:
        x = norm(tgt, layer.norm1)
        tgt = tgt + attention(x + query_pos, x + query_pos, x, layer.self_attn)
        x = norm(tgt, layer.norm2)
        tgt = tgt + attention(x + query_pos, memory + pos, memory, layer.multihead_attn, mask)
        return tgt + ffn(norm(tgt, layer.norm3), layer)
    tgt = norm(tgt + attention(tgt + query_pos, tgt + query_pos, tgt, layer.self_attn), layer.norm1)
    tgt = norm(tgt + attention(tgt + query_pos, memory + pos, memory, layer.multihead_attn, mask), layer.norm2)
    return norm(tgt + ffn(tgt, layer), layer.norm3)


def ref_transformer(model, src, mask, query_embed, pos_embed):
    b, c, h, w = src.shape
    src = src.flatten(2).permute(2, 0, 1)
    pos = pos_embed.flatten(2).permute(2, 0, 1)
    mask = mask.flatten(1)
    query_pos = query_embed[:, None].repeat(1, b, 1)
    memory = src
    for layer in model.encoder.layers:
        memory = ref_encoder_layer(layer, memory, mask, pos)
    if model.encoder.norm is not None:
        memory = norm(memory, model.encoder.norm)
    tgt = torch.zeros_like(query_pos)  # queries enter only as positional encodings
    outputs = []
    for layer in model.decoder.layers:
        tgt = ref_decoder_layer(layer, tgt, memory, mask, pos, query_pos)
        outputs.append(norm(tgt, model.decoder.norm))
    hs = torch.stack(outputs).transpose(1, 2)  # [layers, B, Q, d]
    return hs, memory.permute(1, 2, 0).reshape(b, c, h, w)


def inputs(batch=2, h=3, w=4, queries=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(batch, D, h, w, generator=g, dtype=torch.float64)
    pos = torch.randn(batch, D, h, w, generator=g, dtype=torch.float64)
    query = torch.randn(queries, D, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    mask[0, :, w - 1] = True  # image 0 is narrower: its last column is padding
    mask[0, h - 1, :] = True  # and shorter
    return src, mask, query, pos


def make_transformer(pre_norm=False, enc=2, dec=3, intermediate=True, seed=0):
    model = Transformer(
        d_model=D,
        nhead=HEADS,
        num_encoder_layers=enc,
        num_decoder_layers=dec,
        dim_feedforward=FFN,
        dropout=0.0,
        normalize_before=pre_norm,
        return_intermediate_dec=intermediate,
    )
    return randomize(model.double(), seed).eval()


@pytest.mark.parametrize("pre_norm", [False, True])
def test_transformer_matches_reference(pre_norm):
    model = make_transformer(pre_norm)
    src, mask, query, pos = inputs()
    with torch.no_grad():
        hs, memory = model(src, mask, query, pos)
        ref_hs, ref_memory = ref_transformer(model, src, mask, query, pos)
    assert hs.shape == (3, 2, 5, D) and memory.shape == src.shape
    torch.testing.assert_close(hs, ref_hs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(memory, ref_memory, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_layers_match_reference(pre_norm):
    src, mask, query, pos = inputs()
    seq, seq_pos, key_mask = src.flatten(2).permute(2, 0, 1), pos.flatten(2).permute(2, 0, 1), mask.flatten(1)
    enc = randomize(TransformerEncoderLayer(D, HEADS, FFN, 0.0, normalize_before=pre_norm).double(), 2).eval()
    dec = randomize(TransformerDecoderLayer(D, HEADS, FFN, 0.0, normalize_before=pre_norm).double(), 3).eval()
    tgt = torch.randn(5, 2, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    query_pos = query[:, None].repeat(1, 2, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            enc(seq, src_key_padding_mask=key_mask, pos=seq_pos),
            ref_encoder_layer(enc, seq, key_mask, seq_pos),
            rtol=1e-10,
            atol=1e-10,
        )
        torch.testing.assert_close(
            dec(tgt, seq, memory_key_padding_mask=key_mask, pos=seq_pos, query_pos=query_pos),
            ref_decoder_layer(dec, tgt, seq, key_mask, seq_pos, query_pos),
            rtol=1e-10,
            atol=1e-10,
        )


def test_norms_present_as_specified():
    post = Transformer(d_model=D, nhead=HEADS, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=FFN)
    pre = Transformer(
        d_model=D, nhead=HEADS, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=FFN, normalize_before=True
    )
    assert post.encoder.norm is None and isinstance(post.decoder.norm, torch.nn.LayerNorm)
    assert isinstance(pre.encoder.norm, torch.nn.LayerNorm) and isinstance(pre.decoder.norm, torch.nn.LayerNorm)


def test_without_intermediate_returns_the_last_layer_only():
    full = make_transformer(intermediate=True)
    last = make_transformer(intermediate=False)
    last.load_state_dict(full.state_dict())
    src, mask, query, pos = inputs()
    with torch.no_grad():
        hs_all, memory_all = full(src, mask, query, pos)
        hs_last, memory_last = last(src, mask, query, pos)
    assert hs_last.shape == (1, 2, 5, D)
    torch.testing.assert_close(hs_last[0], hs_all[-1])
    torch.testing.assert_close(memory_last, memory_all)


def test_padding_is_ignored():
    model = make_transformer()
    src, mask, query, pos = inputs()
    with torch.no_grad():
        hs, memory = model(src, mask, query, pos)
        # Garbage in the padded cells, features and encodings alike, must not reach the unpadded outputs.
        noisy_src = src.masked_fill(mask[:, None], 123.0)
        noisy_pos = pos.masked_fill(mask[:, None], -7.0)
        hs2, memory2 = model(noisy_src, mask, query, noisy_pos)
    torch.testing.assert_close(hs2, hs, rtol=1e-10, atol=1e-10)
    keep = ~mask[:, None].expand_as(memory)
    torch.testing.assert_close(memory2[keep], memory[keep], rtol=1e-10, atol=1e-10)


def test_queries_are_permutation_equivariant():
    # No self-attention mask in the decoder: reordering the queries reorders the outputs, nothing more.
    model = make_transformer()
    src, mask, query, pos = inputs()
    order = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        hs, _ = model(src, mask, query, pos)
        hs_perm, _ = model(src, mask, query[order], pos)
    torch.testing.assert_close(hs_perm, hs[:, :, order], rtol=1e-10, atol=1e-10)


def test_xavier_uniform_init_on_matrices():
    torch.manual_seed(0)
    model = Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            fan_out, fan_in = p.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert float(p.detach().abs().max()) <= bound, name
            # A uniform sample over thousands of entries comes close to the bound and is centred.
            assert float(p.detach().abs().max()) > 0.95 * bound, name
            assert abs(float(p.detach().mean())) < 0.1 * bound, name


def test_dropout_only_in_train_mode():
    model = Transformer(
        d_model=D, nhead=HEADS, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=FFN, dropout=0.5
    ).double()
    src, mask, query, pos = inputs()
    model.eval()
    with torch.no_grad():
        a, _ = model(src, mask, query, pos)
        b, _ = model(src, mask, query, pos)
        model.train()
        c, _ = model(src, mask, query, pos)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_activation_choice():
    layer = TransformerEncoderLayer(D, HEADS, FFN, 0.0, activation="gelu")
    assert layer.activation is F.gelu
    with pytest.raises(ValueError, match="swish"):
        TransformerEncoderLayer(D, HEADS, FFN, 0.0, activation="swish")


def test_stack_modules_clone_independent_layers():
    layer = TransformerEncoderLayer(D, HEADS, FFN, 0.0)
    encoder = TransformerEncoder(layer, 3)
    decoder = TransformerDecoder(TransformerDecoderLayer(D, HEADS, FFN, 0.0), 2, torch.nn.LayerNorm(D))
    assert len(encoder.layers) == 3 and len(decoder.layers) == 2
    with torch.no_grad():
        encoder.layers[0].linear1.weight.add_(1.0)
    assert not torch.equal(encoder.layers[0].linear1.weight, encoder.layers[1].linear1.weight)


def test_build_transformer_from_flags():
    model = build_transformer(tiny_args("--pre_norm", "--dropout", "0.25"))
    assert model.d_model == 32 and model.nhead == 2
    assert len(model.encoder.layers) == 1 and len(model.decoder.layers) == 2
    assert model.decoder.return_intermediate  # the auxiliary losses read every decoder layer
    layer = model.encoder.layers[0]
    assert layer.normalize_before and layer.linear1.out_features == 64 and layer.dropout.p == 0.25
    assert model.encoder.norm is not None
