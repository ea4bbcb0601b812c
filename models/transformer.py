"""The DETR transformer: an encoder over the flattened feature map and a decoder over the object queries.

It differs from nn.Transformer in three ways that matter for DETR: positional encodings are added to the
queries and keys of every attention layer (never to the values), the decoder returns the output of every layer
(for the auxiliary losses) after a shared final LayerNorm, and there is no decoder self-attention mask.
"""

import copy
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# The attention layers keep nn.MultiheadAttention's default need_weights=True path (explicit bmm + softmax)
# rather than the fused kernel: it reproduces the original's numbers bit for bit, including the gradients of
# the first decoder self-attention, which are pure rounding noise (its values are all zero).
# The fast path (models.fast.enable_fast_path) sets `fused_attention` on the layers: the encoder's
# self-attention and the decoder's cross-attention, where nearly all of the attention's time goes, then run
# through scaled_dot_product_attention (need_weights=False), or in training on the CPU through
# explicit_attention_fast_dropout. The decoder's self-attention keeps the explicit path: over
# num_queries tokens it costs nothing, and its noise gradients then stay the original's.


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout for the fast path on the CPU, where torch's bernoulli_ draws one double per element on one
    thread (about 8 ms per million elements on the project's CPU; this takes about 1.5 ms): every 64-bit draw
    of the default generator gives four 16-bit numbers, each element kept when its number is at or above the
    drop threshold. Elements are dropped with probability round(p * 65536) / 65536 (0.100006 for p = 0.1), the
    kept ones scaled by 1 / (1 - p) as F.dropout scales them. Elsewhere (a GPU, TorchScript) it is F.dropout."""
    if not training or p == 0.0:
        return x
    if torch.jit.is_scripting() or x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return x * _keep_mask(x, p)


@torch.jit.unused
def _keep_mask(x: Tensor, p: float) -> Tensor:
    """fast_dropout's mask: 1 / (1 - p) where an element is kept, 0 where dropped, in x's dtype."""
    n = x.numel()
    # random_ from -(2 ** 63) with no upper bound draws all 64 bits.
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    uniform = bits.view(torch.int16)[:n].reshape(x.shape).to(torch.float32)  # integers in [-32768, 32767]
    threshold = float(round(p * 65536) - 32768)
    # Integers: (u - threshold + 1) clamped to [0, 1] is 1 where u >= threshold and 0 below it.
    return uniform.sub_(threshold - 1.0).clamp_(0.0, 1.0).mul_(1.0 / (1.0 - p)).to(x.dtype)


class FastDropout(nn.Dropout):
    """nn.Dropout through fast_dropout (the fast path swaps it in)."""

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)


def explicit_attention_fast_dropout(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor],
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor,
    num_heads: int,
    dropout: float,
) -> Tensor:
    """nn.MultiheadAttention's explicit path (sequence-first, no attention mask) in training, with fast_dropout
    on the attention weights. On the CPU, scaled_dot_product_attention with dropout falls back to this same
    explicit attention, with bernoulli_ dropout."""
    tgt_len, batch, embed = query.shape
    head_dim = embed // num_heads
    q = F.linear(query, in_proj_weight[:embed], in_proj_bias[:embed])
    k = F.linear(key, in_proj_weight[embed : 2 * embed], in_proj_bias[embed : 2 * embed])
    v = F.linear(value, in_proj_weight[2 * embed :], in_proj_bias[2 * embed :])
    q = q.reshape(tgt_len, batch * num_heads, head_dim).transpose(0, 1) * (float(head_dim) ** -0.5)
    k = k.reshape(k.shape[0], batch * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], batch * num_heads, head_dim).transpose(0, 1)
    scores = torch.bmm(q, k.transpose(1, 2))
    if key_padding_mask is not None:
        padding = key_padding_mask.view(batch, 1, 1, -1).expand(-1, num_heads, -1, -1)
        scores = scores.masked_fill(padding.reshape(batch * num_heads, 1, -1), float("-inf"))
    weights = fast_dropout(torch.softmax(scores, dim=-1), dropout, True)
    out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len, batch, embed)
    return F.linear(out, out_proj_weight, out_proj_bias)


def fast_dropout_applies(training: bool, p: float, x: Tensor) -> bool:
    """Whether a fused attention layer takes explicit_attention_fast_dropout: training with dropout on the CPU
    (never under TorchScript)."""
    return training and p > 0.0 and x.device.type == "cpu" and not torch.jit.is_scripting()


def with_pos_embed(tensor: Tensor, pos: Optional[Tensor]) -> Tensor:
    return tensor if pos is None else tensor + pos


class Transformer(nn.Module):
    """Encoder-decoder; forward(src, mask, query_embed, pos_embed) -> (hs [layers, B, Q, d], memory [B, d, H, W])."""

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
        return_intermediate_dec: bool = False,
    ):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        # Pre-norm layers leave their output un-normalized, so the encoder then needs a final LayerNorm.
        encoder_norm = nn.LayerNorm(d_model) if normalize_before else None
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.decoder = TransformerDecoder(
            decoder_layer, num_decoder_layers, nn.LayerNorm(d_model), return_intermediate=return_intermediate_dec
        )
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor):
        bs, c, h, w = src.shape
        # [B, C, H, W] -> [HW, B, C]: sequence first, as nn.MultiheadAttention expects.
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).expand(-1, bs, -1)
        mask = mask.flatten(1)
        # The decoder starts from zeros: the queries enter only through their positional embedding.
        tgt = torch.zeros_like(query_embed)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).reshape(bs, c, h, w)


class TransformerEncoder(nn.Module):
    """A stack of encoder layers, with an optional final norm."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(
        self,
        src: Tensor,
        mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
    ) -> Tensor:
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, pos=pos)
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoder(nn.Module):
    """A stack of decoder layers; with return_intermediate, returns every layer's normed output stacked."""

    def __init__(
        self,
        decoder_layer: nn.Module,
        num_layers: int,
        norm: Optional[nn.Module] = None,
        return_intermediate: bool = False,
    ):
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        output = tgt
        intermediate: List[Tensor] = []
        for layer in self.layers:
            output = layer(
                output,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                pos=pos,
                query_pos=query_pos,
            )
            if self.return_intermediate:
                # Each layer's prediction goes through the same final norm as the last one's.
                intermediate.append(self.norm(output) if self.norm is not None else output)
        if self.norm is not None:
            output = self.norm(output)
        if self.return_intermediate:
            return torch.stack(intermediate)
        return output.unsqueeze(0)


class TransformerEncoderLayer(nn.Module):
    """Self-attention + feed-forward, post-norm by default or pre-norm with normalize_before."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _get_activation_fn(activation)
        self.normalize_before = normalize_before
        self.fused_attention = False  # see the note at the top

    # The same dispatch as TransformerDecoderLayer.cross_attention: TorchScript cannot pass modules to a helper.
    def self_attention(
        self, q: Tensor, k: Tensor, v: Tensor, src_mask: Optional[Tensor], src_key_padding_mask: Optional[Tensor]
    ) -> Tensor:
        attn = self.self_attn
        if self.fused_attention and src_mask is None:
            if fast_dropout_applies(attn.training, attn.dropout, q):
                assert attn.in_proj_weight is not None and attn.in_proj_bias is not None
                return explicit_attention_fast_dropout(
                    q,
                    k,
                    v,
                    src_key_padding_mask,
                    attn.in_proj_weight,
                    attn.in_proj_bias,
                    attn.out_proj.weight,
                    attn.out_proj.bias,
                    attn.num_heads,
                    attn.dropout,
                )
            return attn(q, k, value=v, key_padding_mask=src_key_padding_mask, need_weights=False)[0]
        return attn(q, k, value=v, attn_mask=src_mask, key_padding_mask=src_key_padding_mask)[0]

    def forward_post(
        self,
        src: Tensor,
        src_mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
    ) -> Tensor:
        q = k = with_pos_embed(src, pos)
        src2 = self.self_attention(q, k, src, src_mask, src_key_padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))

    def forward_pre(
        self,
        src: Tensor,
        src_mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
    ) -> Tensor:
        src2 = self.norm1(src)
        q = k = with_pos_embed(src2, pos)
        src2 = self.self_attention(q, k, src2, src_mask, src_key_padding_mask)
        src = src + self.dropout1(src2)
        src2 = self.linear2(self.dropout(self.activation(self.linear1(self.norm2(src)))))
        return src + self.dropout2(src2)

    def forward(
        self,
        src: Tensor,
        src_mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
    ) -> Tensor:
        if self.normalize_before:
            return self.forward_pre(src, src_mask, src_key_padding_mask, pos)
        return self.forward_post(src, src_mask, src_key_padding_mask, pos)


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the encoder memory, feed-forward; post- or pre-norm."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _get_activation_fn(activation)
        self.normalize_before = normalize_before
        self.fused_attention = False  # the cross-attention's; see the note at the top

    def cross_attention(
        self, q: Tensor, k: Tensor, v: Tensor, memory_mask: Optional[Tensor], memory_key_padding_mask: Optional[Tensor]
    ) -> Tensor:
        attn = self.multihead_attn
        if self.fused_attention and memory_mask is None:
            if fast_dropout_applies(attn.training, attn.dropout, q):
                assert attn.in_proj_weight is not None and attn.in_proj_bias is not None
                return explicit_attention_fast_dropout(
                    q,
                    k,
                    v,
                    memory_key_padding_mask,
                    attn.in_proj_weight,
                    attn.in_proj_bias,
                    attn.out_proj.weight,
                    attn.out_proj.bias,
                    attn.num_heads,
                    attn.dropout,
                )
            return attn(q, k, value=v, key_padding_mask=memory_key_padding_mask, need_weights=False)[0]
        return attn(q, k, value=v, attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]

    def forward_post(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        q = k = with_pos_embed(tgt, query_pos)
        tgt2 = self.self_attn(q, k, value=tgt, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.cross_attention(
            with_pos_embed(tgt, query_pos), with_pos_embed(memory, pos), memory, memory_mask, memory_key_padding_mask
        )
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))

    def forward_pre(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        tgt2 = self.norm1(tgt)
        q = k = with_pos_embed(tgt2, query_pos)
        tgt2 = self.self_attn(q, k, value=tgt2, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
        tgt = tgt + self.dropout1(tgt2)
        tgt2 = self.norm2(tgt)
        tgt2 = self.cross_attention(
            with_pos_embed(tgt2, query_pos), with_pos_embed(memory, pos), memory, memory_mask, memory_key_padding_mask
        )
        tgt = tgt + self.dropout2(tgt2)
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(self.norm3(tgt)))))
        return tgt + self.dropout3(tgt2)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        if self.normalize_before:
            return self.forward_pre(
                tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, pos, query_pos
            )
        return self.forward_post(
            tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, pos, query_pos
        )


def _get_clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _get_activation_fn(activation: str):
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    if activation == "glu":
        return F.glu
    raise ValueError(f"activation should be relu, gelu or glu, not {activation!r}")


def build_transformer(args) -> Transformer:
    """The transformer from the flags; the decoder always returns every layer (auxiliary losses need them)."""
    return Transformer(
        d_model=args.hidden_dim,
        dropout=args.dropout,
        nhead=args.nheads,
        dim_feedforward=args.dim_feedforward,
        num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers,
        normalize_before=args.pre_norm,
        return_intermediate_dec=True,
    )
