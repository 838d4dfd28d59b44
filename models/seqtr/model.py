"""SeqTR: visual grounding as autoregressive coordinate-token prediction (Zhu et al., ECCV
2022, arXiv 2203.16265).

Module tree and parameter names follow the official checkpoint layout so an
official ``.pth`` loads strictly: ``vis_enc.darknet.{0..13}`` (mmcv ``ConvModule`` naming
``.conv`` / ``.bn``, DarknetBlock ``module_list.{j}.{0,1}``), ``lan_enc.embedding`` and
``lan_enc.lstm`` (a bidirectional GRU despite the name), ``head.transformer.*``,
``head.predictor.{0,1,2}.fc`` and ``fusion.*``.  Every size is a :class:`SeqTRConfig`
field (``config.py``), so the tiny CPU-trainable model (:func:`seqtr_tiny`) is the same code.

Pixels are RGB float in [0, 255] (no normalisation); ``pad_mask`` is True on padding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.seqtr.config import SEQTR_DET, SEQTR_SEGM, SeqTRConfig, seqtr_tiny  # noqa: F401 (re-exported)
from models.seqtr.cost import seqtr_flops
from models.seqtr.text import PAD


# ----------------------------------------------------------------------------- vision


class ConvModule(nn.Module):
    """mmcv ConvModule: conv (no bias) + BN + LeakyReLU(0.1); names ``conv`` / ``bn``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.LeakyReLU(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


class DarknetBlock(nn.Module):
    """``n`` x [1x1 C -> C/2, 3x3 C/2 -> C], residual unless ``shortcut=False`` (layer 11)."""

    def __init__(self, c: int, n: int, shortcut: bool = True):
        super().__init__()
        self.shortcut = shortcut
        self.module_list = nn.ModuleList(
            nn.Sequential(ConvModule(c, c // 2, 1), ConvModule(c // 2, c, 3)) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        for m in self.module_list:
            x = x + m(x) if self.shortcut else m(x)
        return x


class DarkNet53(nn.Module):
    """DarkNet-53 plus the YOLOv3 head layers 11-13; returns C3, C4, C5 (indices 6, 8, 13)."""

    OUT_INDICES = (6, 8, 13)

    def __init__(self, cfg: SeqTRConfig):
        super().__init__()
        w, b, s = cfg.dark_widths, cfg.dark_blocks, cfg.dark_strides
        layers: list[nn.Module] = [ConvModule(3, cfg.dark_stem, 3, s[0])]
        cin = cfg.dark_stem
        for i in range(5):
            layers += [ConvModule(cin, w[i], 3, s[i + 1]), DarknetBlock(w[i], b[i])]
            cin = w[i]
        layers += [DarknetBlock(w[4], cfg.dark_head_blocks, shortcut=False),
                   ConvModule(w[4], cfg.dark_head_mid, 1), ConvModule(cfg.dark_head_mid, w[4], 3)]
        self.darknet = nn.ModuleList(layers)
        self.channels_last = cfg.channels_last

    def forward(self, img: Tensor) -> list[Tensor]:
        if self.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        outs, x = [], img
        for i, m in enumerate(self.darknet):
            x = m(x)
            if i in self.OUT_INDICES:
                outs.append(x)
        return outs


# --------------------------------------------------------------------------- language


class LanguageEncoder(nn.Module):
    """Embedding + bi-GRU (named ``lstm`` as officially); max over the non-PAD positions.

    The GRU deliberately runs over the PAD positions too (no packing), as the official
    code does: that is why ``max_token`` must match the checkpoint.
    """

    def __init__(self, cfg: SeqTRConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.word_dim)
        self.embedding.weight.requires_grad_(not cfg.freeze_embedding)
        self.lstm = nn.GRU(cfg.word_dim, cfg.gru_hidden, num_layers=1, bidirectional=True, batch_first=True)

    def forward(self, text_ids: Tensor) -> Tensor:
        out, _ = self.lstm(self.embedding(text_ids))  # [B, T, 2H]
        pad = (text_ids == PAD).unsqueeze(-1)
        if bool(pad.all(dim=1).any()):
            raise ValueError("an expression has no token (all PAD): the max-pool is undefined")
        return out.masked_fill(pad, float("-inf")).amax(dim=1)


# ----------------------------------------------------------------------------- fusion


def _pool(stride: int) -> nn.Module:
    return nn.AvgPool2d(2) if stride == 2 else nn.Identity()


class SimpleFusion(nn.Module):
    """Bottom-up C3 -> C4 -> C5 concatenation, projection, then tanh(v) * tanh(y)."""

    def __init__(self, cfg: SeqTRConfig):
        super().__init__()
        s = cfg.dark_strides
        self.down_bot2mid = nn.Sequential(_pool(s[4]), ConvModule(cfg.c3, cfg.bot2mid, 3))
        self.down_mid2top = nn.Sequential(_pool(s[5]), ConvModule(cfg.bot2mid + cfg.c4, cfg.mid2top, 3))
        self.top_project = nn.Sequential(ConvModule(cfg.mid2top + cfg.c5, cfg.top_mid, 3),
                                         ConvModule(cfg.top_mid, 2 * cfg.gru_hidden, 1))

    def visual(self, feats: list[Tensor]) -> Tensor:
        """The visual half ``v`` of the fused map, before the language gate (the probe and the
        colour loss of models/seqtr/probe.py and train.py read it)."""
        c3, c4, c5 = feats
        m = torch.cat([self.down_bot2mid(c3), c4], 1)
        t = torch.cat([self.down_mid2top(m), c5], 1)
        return self.top_project(t)

    def forward(self, feats: list[Tensor], y: Tensor) -> Tensor:
        return torch.tanh(self.visual(feats)) * torch.tanh(y)[:, :, None, None]


# ------------------------------------------------------------------------ transformer


def sine_position_encoding(mask: Tensor, num_feats: int, temperature: float = 10000.0,
                           eps: float = 1e-6) -> Tensor:
    """DETR 2-D sine encoding from a padding mask [B,h,w] (True = pad) -> [B, 2*num_feats, h, w]."""
    not_mask = (~mask).to(torch.float32)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    scale = 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    px = x[..., None] / dim_t
    py = y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class EncoderLayer(nn.Module):
    """Post-norm encoder layer; the positional encoding goes into q and k only."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        q = src + pos
        src = self.norm1(src + self.dropout1(
            self.self_attn(q, q, src, key_padding_mask=key_padding_mask, need_weights=False)[0]))
        return self.norm2(src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class Encoder(nn.Module):
    def __init__(self, cfg: SeqTRConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg.d_model, cfg.heads, cfg.ffn, cfg.dropout)
                                    for _ in range(cfg.enc_layers))

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src


def _heads(x: Tensor, h: int) -> Tensor:
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, attn: nn.MultiheadAttention) -> Tensor:
    """Attention from projected, head-split q/k/v [B,h,n,dh]; ``mask`` True = masked (additive -inf)."""
    w = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)
    if mask is not None:
        w = w.masked_fill(mask, float("-inf"))
    o = w.softmax(-1) @ v
    b, h, n, dh = o.shape
    return attn.out_proj(o.transpose(1, 2).reshape(b, n, h * dh))


class LayerCache(NamedTuple):
    """Per-decoder-layer cache: cross-attention K/V (fixed) and the growing self-attention K/V."""

    cross_k: Tensor
    cross_v: Tensor
    self_k: Tensor | None
    self_v: Tensor | None


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: causal self-attn (seq pos on q,k), cross-attn (sine pos on k), FFN."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.norm3(x + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x))))))

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor,
                key_padding_mask: Tensor) -> Tensor:
        """Full-prefix pass (teacher forcing, and the official no-cache decoding)."""
        n = tgt.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=tgt.device).triu(1)
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt, attn_mask=causal, need_weights=False)[0]))
        tgt = self.norm2(tgt + self.dropout2(self.multihead_attn(
            tgt + query_pos, memory + pos, memory, key_padding_mask=key_padding_mask, need_weights=False)[0]))
        return self._ffn(tgt)

    def cross_kv(self, memory: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys/values, computed once per image (they do not change per step)."""
        d = memory.shape[-1]
        w, b = self.multihead_attn.in_proj_weight, self.multihead_attn.in_proj_bias
        k = F.linear(memory + pos, w[d:2 * d], b[d:2 * d])
        v = F.linear(memory, w[2 * d:], b[2 * d:])
        return _heads(k, self.heads), _heads(v, self.heads)

    def step(self, x: Tensor, query_pos: Tensor, cache: LayerCache, mem_mask: Tensor) -> tuple[Tensor, LayerCache]:
        """One new position [B,1,d]; earlier positions come from ``cache`` (valid: causal + per-token ops)."""
        d = x.shape[-1]
        sa = self.self_attn
        qk_in = x + query_pos
        q = _heads(F.linear(qk_in, sa.in_proj_weight[:d], sa.in_proj_bias[:d]), self.heads)
        k = _heads(F.linear(qk_in, sa.in_proj_weight[d:2 * d], sa.in_proj_bias[d:2 * d]), self.heads)
        v = _heads(F.linear(x, sa.in_proj_weight[2 * d:], sa.in_proj_bias[2 * d:]), self.heads)
        if cache.self_k is not None:
            k = torch.cat([cache.self_k, k], 2)
            v = torch.cat([cache.self_v, v], 2)
        x = self.norm1(x + _attend(q, k, v, None, sa))
        ca = self.multihead_attn
        q2 = _heads(F.linear(x + query_pos, ca.in_proj_weight[:d], ca.in_proj_bias[:d]), self.heads)
        x = self.norm2(x + _attend(q2, cache.cross_k, cache.cross_v, mem_mask, ca))
        return self._ffn(x), LayerCache(cache.cross_k, cache.cross_v, k, v)


class Decoder(nn.Module):
    def __init__(self, cfg: SeqTRConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg.d_model, cfg.heads, cfg.ffn, cfg.dropout)
                                    for _ in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        for layer in self.layers:
            tgt = layer(tgt, query_pos, memory, pos, key_padding_mask)
        return self.norm(tgt)


class InputProj(nn.Module):
    """1x1 conv (with bias) + GroupNorm, no activation; names ``conv`` / ``gn``."""

    def __init__(self, cin: int, d: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, d, 1)
        self.gn = nn.GroupNorm(groups, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.gn(self.conv(x))


class SeqPositionalEncoding(nn.Module):
    def __init__(self, n: int, d: int):
        super().__init__()
        self.embedding = nn.Embedding(n, d)


class AutoRegressiveTransformer(nn.Module):
    def __init__(self, cfg: SeqTRConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.seq_positional_encoding = SeqPositionalEncoding(cfg.seq_len, cfg.d_model)
        # xavier for the transformer proper (xavier_uniform on every parameter with dim > 1,
        # as the official init) ...
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # ... while query_embedding / input_proj keep their default initialisation.
        self.query_embedding = nn.Embedding(cfg.num_bin + 1, cfg.d_model)
        self.input_proj = InputProj(2 * cfg.gru_hidden, cfg.d_model, cfg.gn_groups)


class FC(nn.Module):
    """mmcv-style linear unit (``fc``), optionally followed by ReLU."""

    def __init__(self, cin: int, cout: int, relu: bool):
        super().__init__()
        self.fc = nn.Linear(cin, cout)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc(x)
        return F.relu(x) if self.relu else x


class SeqHead(nn.Module):
    def __init__(self, cfg: SeqTRConfig):
        super().__init__()
        d = cfg.d_model
        self.transformer = AutoRegressiveTransformer(cfg)
        self.predictor = nn.ModuleList([FC(d, d, True), FC(d, d, True), FC(d, cfg.num_bin + 1, False)])

    def predict(self, x: Tensor) -> Tensor:
        for m in self.predictor:
            x = m(x)
        return x


# ----------------------------------------------------------------------------- model


class Memory(NamedTuple):
    """Encoder output of one batch, reused by every decoding step."""

    memory: Tensor  # [B, S, d]
    pos: Tensor  # [B, S, d] sine encoding
    key_padding_mask: Tensor  # [B, S] True = padding
    grid: tuple[int, int]  # (h, w) of the fused map


class SeqTR(nn.Module):
    """The whole model; see the module docstring for inputs."""

    def __init__(self, cfg: SeqTRConfig):
        super().__init__()
        self.cfg = cfg
        self.vis_enc = DarkNet53(cfg)
        self.lan_enc = LanguageEncoder(cfg)
        self.head = SeqHead(cfg)
        self.fusion = SimpleFusion(cfg)

    # -- encoding ---------------------------------------------------------------------
    def encode(self, img: Tensor, pad_mask: Tensor, text_ids: Tensor) -> Memory:
        """Image + text -> transformer memory (everything before the decoder)."""
        feats = self.vis_enc(img)
        y = self.lan_enc(text_ids)
        x = self.head.transformer.input_proj(self.fusion(feats, y))
        h, w = x.shape[-2:]
        mask = F.interpolate(pad_mask[:, None].float(), size=(h, w)).to(torch.bool)[:, 0]
        pos = sine_position_encoding(mask, self.cfg.d_model // 2).to(x.dtype)
        src = x.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        kpm = mask.flatten(1)
        mem = self.head.transformer.encoder(src, pos, kpm)
        return Memory(mem, pos, kpm, (int(h), int(w)))

    def _embed_inputs(self, prefix: Tensor) -> Tensor:
        """[zero start, embed(prefix)] -> [B, 1+len(prefix), d]."""
        b = prefix.shape[0]
        start = prefix.new_zeros((b, 1, self.cfg.d_model), dtype=torch.float32)
        emb = self.head.transformer.query_embedding(prefix)
        return torch.cat([start.to(emb.dtype), emb], 1)

    def decode_hidden(self, mem: Memory, prefix: Tensor) -> Tensor:
        """Full-prefix decoder pass (after the final LayerNorm): [B, 1+len(prefix), d]."""
        tf = self.head.transformer
        tgt = self._embed_inputs(prefix)
        n = tgt.shape[1]
        qpos = tf.seq_positional_encoding.embedding.weight[:n].unsqueeze(0).expand(tgt.shape[0], -1, -1)
        return tf.decoder(tgt, qpos, mem.memory, mem.pos, mem.key_padding_mask)

    def decode(self, mem: Memory, prefix: Tensor) -> Tensor:
        """Full-prefix decoder pass: logits [B, 1+len(prefix), num_bin+1]."""
        return self.head.predict(self.decode_hidden(mem, prefix))

    def forward(self, img: Tensor, pad_mask: Tensor, text_ids: Tensor, targets: Tensor) -> Tensor:
        """Teacher forcing: logits [B, L, num_bin+1] for targets [B, L]."""
        return self.decode(self.encode(img, pad_mask, text_ids), targets[:, :-1])

    # -- generation -------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, img: Tensor, pad_mask: Tensor, text_ids: Tensor, use_cache: bool = True,
                 memory: Memory | None = None) -> tuple[Tensor, Tensor]:
        """Greedy decoding: det 4 steps without EOS, segm 2N+1 steps with EOS (as the official decoding).

        Score = mean max-probability of the emitted tokens, up to and including the first
        EOS.  ``use_cache=False`` re-runs the decoder on the whole prefix each step, as the
        official code does; the cached path gives the same tokens.
        """
        mem = memory if memory is not None else self.encode(img, pad_mask, text_ids)
        steps = 4 if self.cfg.task == "det" else self.cfg.seq_len
        step_fn = self._cached_steps(mem) if use_cache else self._uncached_steps(mem)
        b = mem.memory.shape[0]
        tokens = torch.zeros((b, 0), dtype=torch.long, device=mem.memory.device)
        probs = []
        for t in range(steps):
            logits = step_fn(tokens, t).float()
            if self.cfg.task == "det":
                logits = logits[:, : self.cfg.num_bin]
            p, tok = logits.softmax(-1).max(-1)
            probs.append(p)
            tokens = torch.cat([tokens, tok[:, None]], 1)
        return tokens, self._scores(tokens, torch.stack(probs, 1))

    def _scores(self, tokens: Tensor, probs: Tensor) -> Tensor:
        if self.cfg.task == "det":
            return probs.mean(1)
        eos = tokens == self.cfg.num_bin
        first = torch.where(eos.any(1), eos.float().argmax(1), torch.full_like(tokens[:, 0], tokens.shape[1] - 1))
        keep = torch.arange(tokens.shape[1], device=tokens.device)[None] <= first[:, None]
        return (probs * keep).sum(1) / keep.sum(1)

    def _uncached_steps(self, mem: Memory):
        def step(tokens: Tensor, t: int) -> Tensor:
            return self.head.predict(self.decode_hidden(mem, tokens)[:, -1])
        return step

    def _cached_steps(self, mem: Memory):
        tf = self.head.transformer
        caches = [LayerCache(*layer.cross_kv(mem.memory, mem.pos), None, None) for layer in tf.decoder.layers]
        mem_mask = mem.key_padding_mask[:, None, None, :]
        b, d = mem.memory.shape[0], self.cfg.d_model

        def step(tokens: Tensor, t: int) -> Tensor:
            if t == 0:
                x = mem.memory.new_zeros((b, 1, d))
            else:
                x = tf.query_embedding(tokens[:, -1:])
            qpos = tf.seq_positional_encoding.embedding.weight[t].view(1, 1, d).expand(b, 1, d)
            for i, layer in enumerate(tf.decoder.layers):
                x, caches[i] = layer.step(x, qpos, caches[i], mem_mask)
            return self.head.predict(tf.decoder.norm(x))[:, 0]
        return step

    # -- cost -------------------------------------------------------------------------
    def flops(self, h: int, w: int, text_len: int | None = None) -> dict[str, float]:
        """Analytic FLOPs (2 x MAC of convs, linears, attention matmuls) for one padded h x w image."""
        return seqtr_flops(self.cfg, h, w, text_len)


def seqtr_loss(logits: Tensor, targets: Tensor, task: str, num_bin: int, neg_factor: float = 0.1) -> Tensor:
    """Label-smoothed CE of the official SeqTR loss (neg_factor 0.1): q = 1 - neg on the target,
    neg / V elsewhere; weighted; / (B*T).

    det: the first target token (x1) weighs 1.5; segm: EOS targets weigh 0.1.
    """
    b, t, v = logits.shape
    logp = logits.float().log_softmax(-1)
    q = torch.full_like(logp, neg_factor / v)
    q.scatter_(-1, targets.unsqueeze(-1), 1.0 - neg_factor)
    per_tok = -(q * logp).sum(-1)  # [B, T]
    weight = torch.ones_like(per_tok)
    if task == "det":
        weight[:, 0] = 1.5
    elif task == "segm":
        weight = torch.where(targets == num_bin, torch.full_like(weight, 0.1), weight)
    else:
        raise ValueError(f"unknown task {task!r}")
    return (per_tok * weight).sum() / (b * t)
