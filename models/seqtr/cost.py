"""Analytic FLOPs of SeqTR (FLOPs = 2 x MAC; convs, linears, GRU gates, attention matmuls).

Norms, activations and softmax are not counted, matching ``torch.utils.flop_counter``
conventions, as used for a torch.utils.flop_counter count of a replica of the official module
tree (DarkNet 128.6, fusion 30.7, encoder 5.0 GFLOPs at 640x640).  The decoder is costed
as this implementation runs it (cross-attention K/V computed once, self-attention K/V
cached); ``decoder_uncached`` is the official re-run of the whole prefix each step, for
reference.
"""

from __future__ import annotations

from models.seqtr.config import SeqTRConfig


def _out(n: int, stride: int) -> int:
    return (n - 1) // stride + 1  # padding k // 2 for k in {1, 3}


class _ConvTally:
    def __init__(self, h: int, w: int):
        self.h, self.w, self.flops = h, w, 0.0

    def conv(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        self.h, self.w = _out(self.h, stride), _out(self.w, stride)
        self.flops += 2.0 * cin * cout * k * k * self.h * self.w

    def block(self, c: int, n: int) -> None:
        for _ in range(n):
            self.conv(c, c // 2, 1)
            self.conv(c // 2, c, 3)


def darknet_flops(cfg: SeqTRConfig, h: int, w: int) -> tuple[float, list[tuple[int, int]]]:
    """FLOPs of layers 0-13 and the (h, w) of C3, C4, C5."""
    t = _ConvTally(h, w)
    s, wd, nb = cfg.dark_strides, cfg.dark_widths, cfg.dark_blocks
    t.conv(3, cfg.dark_stem, 3, s[0])
    cin, sizes = cfg.dark_stem, []
    for i in range(5):
        t.conv(cin, wd[i], 3, s[i + 1])
        t.block(wd[i], nb[i])
        cin = wd[i]
        if i in (2, 3):
            sizes.append((t.h, t.w))
    t.block(wd[4], cfg.dark_head_blocks)
    t.conv(wd[4], cfg.dark_head_mid, 1)
    t.conv(cfg.dark_head_mid, wd[4], 3)
    sizes.append((t.h, t.w))
    return t.flops, sizes


def fusion_flops(cfg: SeqTRConfig, sizes: list[tuple[int, int]]) -> float:
    (h4, w4), (h5, w5) = sizes[1], sizes[2]
    f = 2.0 * cfg.c3 * cfg.bot2mid * 9 * h4 * w4
    f += 2.0 * (cfg.bot2mid + cfg.c4) * cfg.mid2top * 9 * h5 * w5
    f += 2.0 * (cfg.mid2top + cfg.c5) * cfg.top_mid * 9 * h5 * w5
    f += 2.0 * cfg.top_mid * 2 * cfg.gru_hidden * h5 * w5
    return f


def gru_flops(cfg: SeqTRConfig, t: int) -> float:
    """Both directions, 3 gates, input and hidden matmuls, over all ``t`` (padded) positions."""
    return 2 * t * 2.0 * 3 * (cfg.word_dim * cfg.gru_hidden + cfg.gru_hidden ** 2)


def encoder_flops(cfg: SeqTRConfig, s: int) -> float:
    d, f = cfg.d_model, cfg.ffn
    per_layer = 2.0 * s * d * 3 * d + 4.0 * s * s * d + 2.0 * s * d * d + 4.0 * s * d * f
    return 2.0 * s * 2 * cfg.gru_hidden * d + cfg.enc_layers * per_layer


def _predictor(cfg: SeqTRConfig, n: int) -> float:
    d = cfg.d_model
    return 2.0 * n * (2 * d * d + d * (cfg.num_bin + 1))


def decoder_step_flops(cfg: SeqTRConfig, s: int, prefix: int, cached: bool) -> float:
    """One greedy step whose input has ``prefix`` positions (start token included)."""
    d, f, n = cfg.d_model, cfg.ffn, prefix
    if cached:  # one new position; cross K/V counted once in decoder_flops
        per_layer = 2.0 * d * 3 * d + 4.0 * n * d + 2.0 * d * d + 2.0 * d * d + 4.0 * s * d + 2.0 * d * d + 4.0 * d * f
        return cfg.dec_layers * per_layer + _predictor(cfg, 1)
    per_layer = (2.0 * n * d * 3 * d + 4.0 * n * n * d + 2.0 * n * d * d  # self-attn
                 + 2.0 * n * d * d + 4.0 * s * d * d + 4.0 * n * s * d + 2.0 * n * d * d  # cross-attn
                 + 4.0 * n * d * f)
    return cfg.dec_layers * per_layer + _predictor(cfg, 1)  # predictor on the last position only


def decoder_flops(cfg: SeqTRConfig, s: int, cached: bool = True) -> float:
    steps = 4 if cfg.task == "det" else cfg.seq_len
    total = sum(decoder_step_flops(cfg, s, t + 1, cached) for t in range(steps))
    if cached:
        total += cfg.dec_layers * 4.0 * s * cfg.d_model * cfg.d_model
    return total


def seqtr_flops(cfg: SeqTRConfig, h: int, w: int, text_len: int | None = None) -> dict[str, float]:
    """Per-component FLOPs for one padded ``h`` x ``w`` image; ``total`` uses the cached decoder."""
    dark, sizes = darknet_flops(cfg, h, w)
    s = sizes[2][0] * sizes[2][1]
    out = {
        "vis_enc": dark,
        "lan_enc": gru_flops(cfg, text_len or cfg.max_token),
        "fusion": fusion_flops(cfg, sizes),
        "encoder": encoder_flops(cfg, s),
        "decoder": decoder_flops(cfg, s, cached=True),
    }
    out["total"] = sum(out.values())
    out["decoder_uncached"] = decoder_flops(cfg, s, cached=False)
    return out
