"""CF-ViT: a coarse-to-fine vision transformer with a confidence-based early exit.

Our own re-implementation of "CF-ViT: A General Coarse-to-Fine Method for Vision Transformer"
(Chen et al., AAAI 2023, arXiv 2203.03821), written in the style of a timm model file:
building blocks, then the model, then named configurations.

Every image first runs a *coarse stage*: the transformer on the tokens of a 2x down-sampled
image (bilinear, ``align_corners=True``), giving a ``Gc x Gc`` grid.  If its top-1 softmax
confidence reaches the threshold ``eta`` the image exits there.  Otherwise the *fine stage*
runs the same blocks again on a mixed sequence:

* the global class attention ``A`` (an EMA, beta 0.99, of the head-averaged cls row of the
  attention probabilities of every block from ``global_attn_start`` on) ranks the coarse
  patches; the top ``ceil(alpha * Gc^2)`` (alpha 0.5) are replaced by their 2x2 children
  from the full-resolution embedding (grid ``Gf = S / patch``);
* the others stay as coarse *input* embeddings (with the coarse positional embedding);
* the fine embeddings carry the coarse stage's final (normalised) features through the
  ``reuse_block`` (LayerNorm + MLP), nearest-upsampled from ``Gc`` to ``Gf``.

The fine grid is derived from the configuration (``Gf = S / patch``) everywhere, so the
official code's bug (``forward_early_exit`` of the DeiT model hard-codes 14x14 and 224 and
crashes for the 9x9 model) cannot occur here.  Parameter and buffer names follow the official
checkpoints (``pos_embed_list.0/1``, ``reuse_block.0/1``, ``patch_embed.conv1``/``bn1``...
for LV-ViT's conv stem), so those load strictly.

Entry points: :meth:`CfVisionTransformer.forward_exit` (batched inference with a per-row
threshold: coarse for all rows, fine only for the rows that did not exit, scattered back),
:meth:`CfVisionTransformer.forward_all` (both stages for every row, for training and
evaluation), :func:`count_macs` (multiply-accumulates of each stage) and
:func:`create_model`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CfVitConfig:
    """Everything that defines a CF-ViT variant.  ``img_size`` is the fine input side S; the
    coarse input is S/2, so the coarse grid is ``S / (2 * patch_size)`` and the fine grid
    ``S / patch_size`` (always twice the coarse one)."""

    name: str
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    # "patch": one conv with kernel = stride = patch (DeiT); "conv4": LV-ViT's stem
    # (7x7/s2 + two 3x3, each with BN + ReLU, then a (patch/2)-conv with stride patch/2).
    stem: str = "patch"
    stem_channels: int = 64
    skip_lam: float = 1.0  # every residual branch is divided by it (LV-ViT: 2)
    aux_head: bool = False  # LV-ViT's dense head on the patch tokens
    aux_weight: float = 0.25
    coarse_aux_divisor: float = 1.25  # coarse logits = (head + w * max aux) / 1.25; fine: no division
    reuse_mlp_ratio: float = 4.0
    global_attn_start: int = 3  # 0-based index of the first block whose attention enters A
    global_attn_beta: float = 0.99
    alpha: float = 0.5  # share of coarse patches that are split into their 2x2 children
    drop_path_rate: float = 0.0  # training only
    # evaluation pre-processing: resize the short side to int(S / crop_pct), centre-crop S
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.img_size % (2 * self.patch_size):
            raise ValueError(f"img_size {self.img_size} must be a multiple of 2 x patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")
        if self.stem not in ("patch", "conv4"):
            raise ValueError(f"unknown stem {self.stem!r}")
        if self.stem == "conv4" and self.patch_size % 4:
            raise ValueError("the conv4 stem needs a patch size divisible by 4")
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")

    @property
    def coarse_size(self) -> int:
        return self.img_size // 2

    @property
    def coarse_grid(self) -> int:
        return self.coarse_size // self.patch_size

    @property
    def fine_grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_coarse(self) -> int:
        return self.coarse_grid**2

    @property
    def num_fine(self) -> int:
        return self.fine_grid**2

    @property
    def num_selected(self) -> int:
        return math.ceil(self.alpha * self.num_coarse)

    @property
    def fine_seq_len(self) -> int:
        """Tokens entering the blocks in the fine stage with informative selection."""
        k = self.num_selected
        return 1 + 4 * k + (self.num_coarse - k)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CfVitConfig:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("mean", "std"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


def _deit_small(coarse: int) -> CfVitConfig:
    return CfVitConfig(name=f"cf_deit_small_{coarse}", img_size=32 * coarse, patch_size=16, embed_dim=384, depth=12,
                       num_heads=6, mlp_ratio=4.0, qkv_bias=True, ln_eps=1e-6, stem="patch", skip_lam=1.0,
                       aux_head=False, reuse_mlp_ratio=4.0, global_attn_start=3, crop_pct=0.875)


def _lvvit_small(coarse: int) -> CfVitConfig:
    return CfVitConfig(name=f"cf_lvvit_small_{coarse}", img_size=32 * coarse, patch_size=16, embed_dim=384, depth=16,
                       num_heads=6, mlp_ratio=3.0, qkv_bias=False, ln_eps=1e-5, stem="conv4", stem_channels=64,
                       skip_lam=2.0, aux_head=True, aux_weight=0.25, coarse_aux_divisor=1.25, reuse_mlp_ratio=3.0,
                       global_attn_start=3, crop_pct=0.9)


# The demo: 32x32 glyphs, patch 4, coarse 4x4 (from the 16x16 down-sample), fine 8x8.  The
# transformer is the DeiT flavour (qkv bias, LN eps 1e-6, no skip scaling, one head); the
# patch embedding is LV-ViT's conv stem at 32 channels (7x7/s2, 3x3, 3x3 with BN + ReLU, then a
# 2x2/s2 projection): from scratch on the cluttered glyphs the single-conv DeiT embedding sat at
# chance for hundreds of steps, the conv stem starts learning at once.  Class attention enters A
# from the 2nd block on (the official models start at the 4th block, index 3): with 6 blocks
# "from the 4th" would leave only three.
TINY_GLYPHS = CfVitConfig(name="cf_tiny_glyphs", img_size=32, patch_size=4, num_classes=54, embed_dim=128, depth=6,
                          num_heads=4, mlp_ratio=3.0, qkv_bias=True, ln_eps=1e-6, stem="conv4", stem_channels=32,
                          skip_lam=1.0, aux_head=False, reuse_mlp_ratio=3.0, global_attn_start=1, crop_pct=1.0,
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

CONFIGS: dict[str, CfVitConfig] = {
    "cf_deit_small_7": _deit_small(7),
    "cf_deit_small_9": _deit_small(9),
    "cf_lvvit_small_7": _lvvit_small(7),
    "cf_lvvit_small_9": _lvvit_small(9),
    "cf_tiny_glyphs": TINY_GLYPHS,
}


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

# Fused attention where the probabilities are not needed (a module attribute so that a test can
# swap in the explicit form, e.g. to count it with torch.utils.flop_counter).
_sdpa = F.scaled_dot_product_attention


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention.  With ``need_cls_attn`` it also returns the cls row of the
    attention probabilities, averaged over heads and restricted to the patch columns
    ([B, N-1]); that is all the global class attention needs (the EMA, the head mean and the
    row/column selection are linear, so accumulating the row equals accumulating the maps)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, need_cls_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, hd]
        cls_attn = None
        if need_cls_attn:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = attn @ v
            cls_attn = attn[:, :, 0, 1:].mean(dim=1)
        else:
            out = _sdpa(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), cls_attn


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float, skip_lam: float,
                 drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_lam = skip_lam
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, need_cls_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, cls_attn = self.attn(self.norm1(x), need_cls_attn)
        x = x + self.drop_path(y) / self.skip_lam
        x = x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam
        return x, cls_attn


class PatchEmbed(nn.Module):
    """DeiT: one convolution with kernel = stride = patch size."""

    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ConvStem(nn.Module):
    """LV-ViT's 4-layer stem: conv 7x7/s2/p3 + BN + ReLU, two conv 3x3/p1 + BN + ReLU (all
    without bias), then a (patch/2)x(patch/2) projection with stride patch/2 (with bias)."""

    def __init__(self, patch: int, in_chans: int, dim: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(width, dim, kernel_size=patch // 2, stride=patch // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class CoarseResult(NamedTuple):
    logits: torch.Tensor  # [B, C] (LV-ViT: the /1.25 form)
    features: torch.Tensor  # [B, 1+Nc, D], after the final norm
    embeddings: torch.Tensor  # [B, 1+Nc, D], the coarse input embeddings (cls + pos included)
    score: torch.Tensor  # [B, Nc], global class attention on the coarse patches


ALL_FINE = 1.01  # an eta no confidence reaches (a softmax can saturate to exactly 1.0): every row runs the fine stage
CoarseRunner = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # x -> (logits, features, embeddings, score)
FineRunner = Callable[..., torch.Tensor]  # (x, features, embeddings, kids, rest) -> logits


class ExitOutput(NamedTuple):
    logits: torch.Tensor  # [B, C]: coarse logits for exited rows, fine logits for the others
    exited: torch.Tensor  # [B] bool: True where the coarse confidence reached eta
    confidence: torch.Tensor  # [B] float32: top-1 softmax probability of the coarse logits


def children_indices(selected: torch.Tensor, coarse_grid: int) -> torch.Tensor:
    """Fine-grid token indices (into the patch tokens, without cls) of the 2x2 children of
    coarse patches ``selected`` ([B, k], row-major on a ``coarse_grid`` grid).  Returns
    [B, 4k]: all top-left children, then top-right, bottom-left, bottom-right."""
    gf = 2 * coarse_grid
    r, c = selected // coarse_grid, selected % coarse_grid
    tl = 2 * r * gf + 2 * c
    return torch.cat([tl, tl + 1, tl + gf, tl + gf + 1], dim=1)


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class CfVisionTransformer(nn.Module):
    """``init_weights=False`` skips the random initialisation (when a checkpoint is loaded next)."""

    def __init__(self, cfg: CfVitConfig, init_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        if cfg.stem == "patch":
            self.patch_embed: nn.Module = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        else:
            self.patch_embed = ConvStem(cfg.patch_size, cfg.in_chans, d, cfg.stem_channels)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed_list = nn.ParameterList([nn.Parameter(torch.zeros(1, cfg.num_coarse + 1, d)),
                                                nn.Parameter(torch.zeros(1, cfg.num_fine + 1, d))])
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.ln_eps, cfg.skip_lam, dpr[i])
            for i in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.head = nn.Linear(d, cfg.num_classes)
        if cfg.aux_head:
            self.aux_head = nn.Linear(d, cfg.num_classes)
        self.reuse_block = nn.Sequential(nn.LayerNorm(d, eps=cfg.ln_eps), Mlp(d, int(d * cfg.reuse_mlp_ratio)))
        if init_weights:
            self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for p in self.pos_embed_list:
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- pieces ---------------------------------------------------------------------------

    def coarse_input(self, x: torch.Tensor) -> torch.Tensor:
        """The coarse image: bilinear (align_corners=True) down-sample of the normalised fine
        input to S/2.  Never squeezed, so a batch of one stays a batch."""
        s = self.cfg.coarse_size
        return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=True)

    def _embed(self, x: torch.Tensor, pos: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        t = self.patch_embed(x)
        if extra is not None:
            t = t + extra
        return torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + pos

    def _logits(self, z: torch.Tensor, coarse: bool) -> torch.Tensor:
        out = self.head(z[:, 0])
        if self.cfg.aux_head:
            out = out + self.cfg.aux_weight * self.aux_head(z[:, 1:]).max(dim=1).values
            if coarse:
                out = out / self.cfg.coarse_aux_divisor
        return out

    def coarse_stage(self, x: torch.Tensor) -> CoarseResult:
        """The coarse pass on fine inputs ``x`` [B, 3, S, S] (normalised)."""
        cfg = self.cfg
        e = self._embed(self.coarse_input(x), self.pos_embed_list[0])
        h, score = e, None
        for i, blk in enumerate(self.blocks):
            need = i >= cfg.global_attn_start
            h, a = blk(h, need_cls_attn=need)
            if need:
                a = a.detach()
                score = (1 - cfg.global_attn_beta) * a if score is None else (
                    cfg.global_attn_beta * score + (1 - cfg.global_attn_beta) * a)
        if score is None:  # global_attn_start >= depth: no ranking information, keep grid order
            score = torch.zeros(x.shape[0], cfg.num_coarse, device=x.device, dtype=x.dtype)
        z = self.norm(h)
        return CoarseResult(self._logits(z, coarse=True), z, e, score)

    def reuse_features(self, coarse_features: torch.Tensor) -> torch.Tensor:
        """LN + MLP on the normalised coarse patch outputs, nearest-upsampled Gc -> Gf: [B, Gf^2, D]."""
        cfg = self.cfg
        r = self.reuse_block(coarse_features[:, 1:])
        b, _, d = r.shape
        r = r.transpose(1, 2).reshape(b, d, cfg.coarse_grid, cfg.coarse_grid)
        r = F.interpolate(r, size=(cfg.fine_grid, cfg.fine_grid), mode="nearest")
        return r.flatten(2).transpose(1, 2)

    def selection(self, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The informative selection from the global class attention ``score`` [B, Nc]: the
        fine-grid indices of the top-k coarse patches' children [B, 4k] and the indices of the
        other coarse patches [B, Nc-k].  Ties keep grid order (a stable sort)."""
        order = score.argsort(dim=1, descending=True, stable=True)
        k = self.cfg.num_selected
        return children_indices(order[:, :k], self.cfg.coarse_grid), order[:, k:].contiguous()

    def fine_sequence(self, x: torch.Tensor, coarse: CoarseResult, informative_selection: bool = True) -> torch.Tensor:
        """The token sequence of the fine stage: [cls] + the 2x2 children of the top-k coarse
        patches (fine embeddings + reuse) + the other coarse input embeddings.  Without
        informative selection (the first part of training): all Gf^2 fine tokens."""
        ef = self._embed(x, self.pos_embed_list[1], self.reuse_features(coarse.features))
        if not informative_selection:
            return ef
        kids, rest = self.selection(coarse.score)
        return self._select(ef, coarse.embeddings, kids, rest)

    @staticmethod
    def _select(ef: torch.Tensor, coarse_embeddings: torch.Tensor, kids: torch.Tensor,
                rest: torch.Tensor) -> torch.Tensor:
        return torch.cat([ef[:, :1], _gather_tokens(ef[:, 1:], kids), _gather_tokens(coarse_embeddings[:, 1:], rest)],
                         dim=1)

    def _fine_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            h, _ = blk(h)
        return self._logits(self.norm(h), coarse=False)

    def fine_stage(self, x: torch.Tensor, coarse: CoarseResult, informative_selection: bool = True) -> torch.Tensor:
        return self._fine_blocks(self.fine_sequence(x, coarse, informative_selection))

    # ---- the two stages as graphs: tensors in, tensors out (what another engine runs) -----

    def coarse_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``coarse_stage`` as a tuple: (logits, features, embeddings, score)."""
        return tuple(self.coarse_stage(x))  # type: ignore[return-value]

    def fine_logits(self, x: torch.Tensor, features: torch.Tensor, embeddings: torch.Tensor, kids: torch.Tensor,
                    rest: torch.Tensor) -> torch.Tensor:
        """The fine stage's logits given the coarse stage's features and input embeddings and
        the selection (``selection``): ``fine_stage`` without the sort, which stays outside an
        exported graph (ONNX has no stable sort)."""
        ef = self._embed(x, self.pos_embed_list[1], self.reuse_features(features))
        return self._fine_blocks(self._select(ef, embeddings, kids, rest))

    # ---- entry points ---------------------------------------------------------------------

    def forward_all(self, x: torch.Tensor, informative_selection: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Both stages for every row: (coarse logits, fine logits).  For training and for
        measuring a whole eta curve in one pass."""
        c = self.coarse_stage(x)
        return c.logits, self.fine_stage(x, c, informative_selection)

    def forward(self, x: torch.Tensor, informative_selection: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_all(x, informative_selection)

    def forward_exit(self, x: torch.Tensor, eta: torch.Tensor | float, coarse: CoarseRunner | None = None,
                     fine: FineRunner | None = None) -> ExitOutput:
        """Early-exit inference.  ``eta``: a scalar or a per-row tensor [B].  A row exits at the
        coarse stage when its coarse confidence >= its eta (eta 0: every row exits; eta > 1:
        none does).  The fine stage runs only on the rows that did not exit.  ``coarse``,
        ``fine``: what runs each stage, with the signatures of ``coarse_outputs`` and
        ``fine_logits`` (another engine's graphs of them); this network's own by default."""
        logits, features, embeddings, score = (coarse or self.coarse_outputs)(x)
        conf = logits.float().softmax(dim=-1).max(dim=-1).values
        eta_t = torch.as_tensor(eta, dtype=torch.float32, device=x.device).expand(x.shape[0])
        exited = conf >= eta_t
        go = (~exited).nonzero(as_tuple=True)[0]
        if go.numel():
            kids, rest = self.selection(score[go])
            out = (fine or self.fine_logits)(x[go], features[go], embeddings[go], kids, rest)
            logits = logits.clone()
            logits[go] = out.to(logits.dtype)
        return ExitOutput(logits, exited, conf)


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Macs:
    """Multiply-accumulates per image (CF-ViT's "FLOPs" are MACs, the fvcore convention).

    Counted: convolutions, linear layers and the two attention matmuls, i.e. what
    ``torch.utils.flop_counter`` counts, divided by 2.  Not counted: norms, activations,
    softmax, the resizes.  ``fine_increment`` is what an image that does not exit adds (the
    fine embedding, the reuse MLP, the blocks on the fine sequence and the head)."""

    coarse: int
    fine_increment: int
    fine_increment_no_selection: int  # the fine stage on all Gf^2 tokens (early training)
    breakdown: dict = field(default_factory=dict, compare=False)

    @property
    def full(self) -> int:
        return self.coarse + self.fine_increment

    def expected(self, exit_rate: float) -> float:
        """C(eta) = C_coarse + (1 - p_exit) * C_fine_increment."""
        return self.coarse + (1.0 - exit_rate) * self.fine_increment


def _stem_macs(cfg: CfVitConfig, side: int) -> int:
    d, p = cfg.embed_dim, cfg.patch_size
    if cfg.stem == "patch":
        return (side // p) ** 2 * d * cfg.in_chans * p * p
    w = cfg.stem_channels
    h1 = (side + 2 * 3 - 7) // 2 + 1
    macs = h1 * h1 * w * cfg.in_chans * 49 + 2 * h1 * h1 * w * w * 9
    q = p // 2
    return macs + (h1 // q) ** 2 * d * w * q * q


def _blocks_macs(cfg: CfVitConfig, n: int) -> int:
    d = cfg.embed_dim
    hidden = int(d * cfg.mlp_ratio)
    per_block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden
    return cfg.depth * per_block


def _head_macs(cfg: CfVitConfig, n_tokens: int) -> int:
    macs = cfg.embed_dim * cfg.num_classes
    if cfg.aux_head:
        macs += (n_tokens - 1) * cfg.embed_dim * cfg.num_classes
    return macs


def count_macs(cfg: CfVitConfig) -> Macs:
    """MACs of the coarse stage and of the fine increment for any configuration."""
    d = cfg.embed_dim
    nc, nf, nsel = cfg.num_coarse + 1, cfg.num_fine + 1, cfg.fine_seq_len
    coarse = {"embed": _stem_macs(cfg, cfg.coarse_size), "blocks": _blocks_macs(cfg, nc), "head": _head_macs(cfg, nc)}
    reuse = cfg.num_coarse * 2 * d * int(d * cfg.reuse_mlp_ratio)
    fine_common = {"embed": _stem_macs(cfg, cfg.img_size), "reuse": reuse}
    fine = {**fine_common, "blocks": _blocks_macs(cfg, nsel), "head": _head_macs(cfg, nsel)}
    fine_all = {**fine_common, "blocks": _blocks_macs(cfg, nf), "head": _head_macs(cfg, nf)}
    return Macs(coarse=sum(coarse.values()), fine_increment=sum(fine.values()),
                fine_increment_no_selection=sum(fine_all.values()),
                breakdown={"coarse": coarse, "fine": fine, "tokens": {"coarse": nc, "fine": nsel}})


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def create_model(name: str | CfVitConfig, **overrides) -> CfVisionTransformer:
    """``create_model("cf_deit_small_7")``, ``create_model("cf_tiny_glyphs", num_classes=36)``
    or ``create_model(config)``."""
    cfg = name if isinstance(name, CfVitConfig) else CONFIGS[name]
    if overrides:
        cfg = replace(cfg, **overrides)
    return CfVisionTransformer(cfg)
