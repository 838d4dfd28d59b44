"""The sizes of a SeqTR model (:class:`SeqTRConfig`) and its presets: the official det and
segm models and the tiny CPU-trainable one.

Kept apart from ``model.py`` so that the analytic cost (``cost.py``) needs only the sizes:
``model.py`` imports both, neither imports ``model.py``.  ``models.seqtr.model`` re-exports
every name here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class SeqTRConfig:
    """All sizes of a SeqTR model; the defaults are the official det model."""

    vocab_size: int = 10000
    word_dim: int = 300
    gru_hidden: int = 512
    freeze_embedding: bool = True
    # DarkNet-53: stem conv width, then the 5 stage widths / residual block counts.
    dark_stem: int = 32
    dark_widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    dark_blocks: tuple[int, ...] = (1, 2, 8, 8, 4)
    # Strides of the six plain convs (layers 0, 1, 3, 5, 7, 9); official (1, 2, 2, 2, 2, 2).
    # A stride-1 layer 7 or 9 turns the matching fusion AvgPool into an identity, which is
    # how a tiny model gets a stride-16 fusion output.
    dark_strides: tuple[int, ...] = (1, 2, 2, 2, 2, 2)
    dark_head_blocks: int = 2  # layer 11: DarknetBlock(C5, n, no shortcut)
    dark_head_mid: int = 512  # layer 12: 1x1 C5 -> mid; layer 13: 3x3 mid -> C5
    # Fusion widths; None = the official choice (as the official SimpleFusion: C3, C3'+C4, C4'+C5).
    fuse_bot2mid: int | None = None
    fuse_mid2top: int | None = None
    fuse_top_mid: int | None = None
    d_model: int = 256
    heads: int = 8
    ffn: int = 1024
    enc_layers: int = 6
    dec_layers: int = 3
    dropout: float = 0.1
    gn_groups: int = 32
    num_bin: int = 1000
    task: str = "det"  # "det" | "segm"
    num_points: int = 12  # N, segm only
    max_token: int = 15
    long_side: int = 640
    size_divisor: int = 32
    # Run the CNN in channels-last memory format (a speed choice only: same numbers up to
    # float rounding; ~15 % faster CPU training of the tiny model).
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.dark_widths = tuple(self.dark_widths)
        self.dark_blocks = tuple(self.dark_blocks)
        self.dark_strides = tuple(self.dark_strides)
        if self.task not in ("det", "segm"):
            raise ValueError(f"task must be 'det' or 'segm', got {self.task!r}")
        if len(self.dark_widths) != 5 or len(self.dark_blocks) != 5 or len(self.dark_strides) != 6:
            raise ValueError("dark_widths/dark_blocks need 5 entries, dark_strides 6")
        if self.d_model % self.heads or self.d_model % self.gn_groups:
            raise ValueError("d_model must be divisible by heads and gn_groups")

    @property
    def seq_len(self) -> int:
        """Decoder positions: [start, x1, y1, x2, y2] or [start, x1 .. yN]."""
        return 5 if self.task == "det" else 2 * self.num_points + 1

    @property
    def c3(self) -> int:
        return self.dark_widths[2]

    @property
    def c4(self) -> int:
        return self.dark_widths[3]

    @property
    def c5(self) -> int:
        return self.dark_widths[4]

    @property
    def bot2mid(self) -> int:
        return self.fuse_bot2mid or self.c3

    @property
    def mid2top(self) -> int:
        return self.fuse_mid2top or (self.bot2mid + self.c4)

    @property
    def top_mid(self) -> int:
        return self.fuse_top_mid or (self.mid2top + self.c5)

    @property
    def stride(self) -> int:
        """Output stride of the fused map (32 for the official model)."""
        return math.prod(self.dark_strides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SeqTRConfig":
        return cls(**d)


def SEQTR_DET(vocab_size: int, max_token: int = 15) -> SeqTRConfig:  # noqa: N802 - preset name
    """The official REC (box) model."""
    return SeqTRConfig(vocab_size=vocab_size, task="det", max_token=max_token)


def SEQTR_SEGM(vocab_size: int, num_points: int = 12, max_token: int = 15) -> SeqTRConfig:  # noqa: N802
    """The official RES (contour) model; N = 18 for RefCOCO, 12 for RefCOCO+/g (the official dataset configs)."""
    return SeqTRConfig(vocab_size=vocab_size, task="segm", num_points=num_points, max_token=max_token)


def seqtr_tiny(task: str = "det", vocab_size: int = 64, num_points: int = 12, max_token: int = 8,
               num_bin: int = 128, **overrides) -> SeqTRConfig:
    """A CPU-trainable model of the same classes for 128x128 synthetic scenes.

    Stride 16 (layers 0, 1, 3, 7 at stride 2; 5 and 9 at stride 1, so the C4->C5 fusion
    pool is an identity) gives an 8x8 memory at 128 px: 4x4 is too coarse to place 12
    contour points.  The learned 32-d embedding replaces frozen GloVe; dropout is 0
    because the synthetic data is unlimited (and dropout masks cost ~20 % of a CPU step).
    A batch-32 training step costs ~0.11 s of CPU time on one thread (docs/SEQTR.md).
    """
    cfg = dict(vocab_size=vocab_size, word_dim=32, gru_hidden=64, freeze_embedding=False,
               dark_stem=8, dark_widths=(16, 24, 32, 48, 64), dark_blocks=(1, 1, 1, 1, 1),
               dark_strides=(2, 2, 2, 1, 2, 1), dark_head_blocks=1, dark_head_mid=32,
               fuse_bot2mid=16, fuse_mid2top=32, fuse_top_mid=64,
               d_model=64, heads=4, ffn=256, enc_layers=2, dec_layers=2, dropout=0.0, gn_groups=32,
               num_bin=num_bin, task=task, num_points=num_points, max_token=max_token,
               long_side=128, size_divisor=16, channels_last=True)
    cfg.update(overrides)
    return SeqTRConfig(**cfg)
