"""ARM end to end: plan (tiles, edge scores, one rung per tile) then run (batched by rung).

``plan`` is cheap and runs no network, so the caller (the serving runtime) knows the exact
FLOPs and predicted quality of a request before committing compute; ``run`` executes a
plan, batching every tile that shares a rung.  No FastAPI here: the service imports this.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.arm import dispatch, tiling
from models.arm.checkpoint import load_full_state, load_official_state_table
from models.arm.edge import edge_scores_gray, gray_u8
from models.arm.nets import FSRCNN, SCALE, Backbone, SubPixelDeconv, extract_subnet, get_backbone, official_flops
from models.arm.table import EdgeTable, mse_to_psnr
from models.common.fusion import fuse_conv_activations

# oneDNN caches 1024 primitives by default.  A served model meets every batch size from 1
# to max_batch at every rung (about five convolution primitives each for FSRCNN), so the
# default cache thrashes: cycling 100 batch sizes through the three FSRCNN subnets missed
# ~1,300 times per pass with 1024 and never with 8192, and re-creating the primitives of
# one rung and batch size costs 3-4 ms on 2 cores.  8192 holds them all for a few MiB.  An explicit setting wins;
# it only takes effect before the process's first convolution, hence here, at import.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")

Mode = Literal["budget", "seconds", "best", "fixed", "eta"]
Objective = Literal["mse", "psnr_sum"]
IMAGE_PSNR_CROP = 4  # output pixels of border an image PSNR leaves out (metrics.psnr_rgb, evaluate.py)


@dataclass(frozen=True)
class Rung:
    index: int
    name: str  # "bicubic", "w56", "w56-int8" or "w56-bf16"
    width: int  # 0 for bicubic
    flops_per_patch: int  # official convention (32x32 LR patch), whatever the precision
    params: int
    precision: str = "fp32"  # "fp32", "int8" (real int8 kernels) or "bf16" (bf16 sections)


@dataclass
class Plan:
    positions: np.ndarray  # (N, 2) LR corners
    rungs: np.ndarray  # (N,) rung index per patch
    scores: np.ndarray  # (N,) edge score per patch
    pred_mse: np.ndarray  # (N,) predicted per-pixel MSE of the chosen rung
    flops: float  # sum over patches of the chosen rung's cost
    flops_full: float  # the same image at full width everywhere
    lr_hw: tuple[int, int]  # padded LR size the tiles live in
    out_hw: tuple[int, int]  # output size (4x the original input)
    tiling: str
    budget: float | None
    info: dict = field(default_factory=dict)
    # How many scored output pixels each patch's prediction stands for (``patch_pixel_weights``):
    # its own share of the stitched canvas, and its share of the bicubic fill (official tiling).
    # None: computed from ``positions`` and ``out_hw``.
    pixel_weight: np.ndarray | None = None  # (N,) float64
    fill_weight: np.ndarray | None = None  # (N,) float64, all 0 in full tiling
    fill_mse: np.ndarray | None = None  # (N,) predicted bicubic (rung 0) MSE per patch; None: pred_mse

    def __post_init__(self) -> None:
        if self.pixel_weight is None or self.fill_weight is None:
            self.pixel_weight, self.fill_weight = patch_pixel_weights(self.positions, self.out_hw)
        if self.fill_mse is None:
            self.fill_mse = self.pred_mse

    @property
    def flops_fraction(self) -> float:
        return self.flops / self.flops_full if self.flops_full else 0.0

    @property
    def predicted_image_mse(self) -> float:
        """Predicted per-pixel squared error (0..255 scale, all three channels) of the stitched
        output against the ground truth, over the pixels ``metrics.psnr_rgb`` scores (a 4 px
        border left out): each patch's predicted MSE weighted by the output pixels it stands
        for.  Assumes the patches that overlap at a pixel err alike (averaging them would
        lower the error if they did not)."""
        w, fw = self.pixel_weight, self.fill_weight
        total = float(w.sum() + fw.sum())
        if total <= 0:
            return float(self.pred_mse.mean())
        return float((w @ self.pred_mse + fw @ self.fill_mse) / total)

    @property
    def predicted_image_psnr(self) -> float:
        """The table's prediction of the output image's PSNR (dB, RGB, 4 px crop: what
        ``metrics.psnr_rgb`` measures): ``mse_to_psnr(predicted_image_mse)``.  Never above
        the pixel-weighted mean of the patches' own predicted PSNRs (Jensen)."""
        return float(mse_to_psnr(self.predicted_image_mse))

    @property
    def predicted_patch_psnr(self) -> float:
        """The PSNR of the *unweighted* mean over patches of their predicted MSE: the table's
        per-patch measure (each 128 x 128 output patch alone, its 4 px border cropped), with
        no regard to how much of the image each patch makes.  What the server's
        ``X-Anytime-Predicted-PSNR`` carried up to now."""
        return float(mse_to_psnr(self.pred_mse.mean()))

    @property
    def predicted_psnr(self) -> float:
        """Deprecated alias of ``predicted_patch_psnr`` (kept for its existing callers); the
        image's PSNR is ``predicted_image_psnr``."""
        return self.predicted_patch_psnr

    def rung_counts(self, n_rungs: int) -> list[int]:
        return np.bincount(self.rungs, minlength=n_rungs).tolist()


def rung_work(rungs: np.ndarray) -> list[tuple[int, int]]:
    """(rung, patches) for every rung a plan uses: one forward pass (or more) each."""
    used, counts = np.unique(rungs, return_counts=True)
    return list(zip(used.tolist(), counts.tolist()))


@dataclass
class Analysis:
    """What planning needs from an image, whatever the budget."""

    positions: np.ndarray  # (N, 2) LR corners
    scores: np.ndarray  # (N,) edge score per patch
    pred_psnr: np.ndarray  # (N, R) the table's PSNR per patch and rung
    pred_mse: np.ndarray  # (N, R) the same as per-pixel MSE
    lr_hw: tuple[int, int]  # padded LR size the tiles live in
    out_hw: tuple[int, int]  # output size (4x the original input)
    tiling: str
    pixel_weight: np.ndarray | None = None  # (N,) see Plan; None: computed here
    fill_weight: np.ndarray | None = None  # (N,)

    def __post_init__(self) -> None:
        if self.pixel_weight is None or self.fill_weight is None:
            self.pixel_weight, self.fill_weight = patch_pixel_weights(self.positions, self.out_hw)

    def seconds_dispatch(self, times: dispatch.RungTimes) -> dispatch.SecondsDispatch:
        """The time-budget solver for this image on ``times``, kept for the next budget a
        planner tries (it prepares one knapsack per set of rungs)."""
        cached = self.__dict__.get("_seconds")
        if cached is None or cached[0] is not times:
            cached = self.__dict__["_seconds"] = (times, dispatch.SecondsDispatch(self.pred_mse, times))
        return cached[1]


def patch_pixel_weights(positions: np.ndarray, out_hw: tuple[int, int], crop: int = IMAGE_PSNR_CROP,
                        patch: int = tiling.PATCH, scale: int = SCALE) -> tuple[np.ndarray, np.ndarray]:
    """How many of the output pixels that an image PSNR scores each patch stands for, as
    ``ArmSR.assemble`` stitches: (weight, fill_weight), float64 (N,) each.

    The scored pixels are the (out_h, out_w) canvas less a ``crop``-pixel border (all of it
    when the crop would leave nothing).  A pixel that k patches cover is their plain average
    (``tiling.Canvas``), so it adds 1/k to each one's ``weight``.  A pixel no patch covers
    beyond the tiles' extent (official tiling's right and bottom remainder, which
    ``assemble`` fills with bicubic) adds to the ``fill_weight`` of the patches covering
    the nearest covered pixel (same row or column, at the extent's edge), split the same
    way; their bicubic error stands for it.  Uncovered pixels inside the extent (no tiling
    here makes any) count for nothing.  ``weight.sum() + fill_weight.sum()`` is then the
    number of scored pixels.

    Exact and cheap at any size: coverage is constant between consecutive patch edges, so
    the canvas is reduced to that grid of cells (coordinate compression)."""
    pos = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
    n = len(pos)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    h, w = int(out_hw[0]), int(out_hw[1])
    if h - 2 * crop <= 0 or w - 2 * crop <= 0:
        crop = 0
    side = patch * scale
    y0, x0 = np.minimum(pos[:, 0] * scale, h), np.minimum(pos[:, 1] * scale, w)
    y1, x1 = np.minimum(y0 + side, h), np.minimum(x0 + side, w)
    ch, cw = int(y1.max()), int(x1.max())  # covered extent; assemble fills beyond it

    def cells(starts: np.ndarray, ends: np.ndarray, length: int, extent: int) -> np.ndarray:
        return np.unique(np.concatenate([starts, ends, [0, crop, length - crop, length, extent]]))

    by, bx = cells(y0, y1, h, ch), cells(x0, x1, w, cw)
    iy0, iy1, ix0, ix1 = (np.searchsorted(b, v) for b, v in ((by, y0), (by, y1), (bx, x0), (bx, x1)))
    ny, nx = len(by) - 1, len(bx) - 1
    diff = np.zeros((ny + 1, nx + 1))
    for iy, ix, sign in ((iy0, ix0, 1), (iy1, ix0, -1), (iy0, ix1, -1), (iy1, ix1, 1)):
        np.add.at(diff, (iy, ix), sign)
    count = diff.cumsum(0).cumsum(1)[:ny, :nx]
    mid_y, mid_x = (by[:-1] + by[1:]) / 2, (bx[:-1] + bx[1:]) / 2
    scored_y = (mid_y > crop) & (mid_y < h - crop)
    scored_x = (mid_x > crop) & (mid_x < w - crop)
    area = np.outer(np.diff(by) * scored_y, np.diff(bx) * scored_x).astype(np.float64)
    covered = count > 0
    safe = np.where(covered, count, 1.0)
    own = np.where(covered, area / safe, 0.0)
    # The fill: cells past the extent, moved onto the last covered cell of their row/column.
    past = (~covered) & ((by[:-1] >= ch)[:, None] | (bx[:-1] >= cw)[None, :]) & (area > 0)
    fill = np.zeros((ny, nx))
    if past.any():
        last_y, last_x = int(np.searchsorted(by, ch)) - 1, int(np.searchsorted(bx, cw)) - 1
        py, px = np.nonzero(past)
        np.add.at(fill, (np.minimum(py, last_y), np.minimum(px, last_x)), area[py, px])
        fill = np.where(covered, fill / safe, 0.0)

    def per_patch(density: np.ndarray) -> np.ndarray:
        s = np.zeros((ny + 1, nx + 1))
        s[1:, 1:] = density.cumsum(0).cumsum(1)
        return s[iy1, ix1] - s[iy0, ix1] - s[iy1, ix0] + s[iy0, ix0]

    return per_patch(own), per_patch(fill)


@functools.lru_cache(maxsize=256)
def tile_layout(lr_h: int, lr_w: int, out_h: int, out_w: int,
                tiling_mode: tiling.Tiling) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The patch corners of a padded (lr_h, lr_w) image and their ``patch_pixel_weights``
    for an (out_h, out_w) output, read-only.

    They depend on the image's size alone, and a service sees the same few sizes again and
    again: cached, they cost nothing after the first request of a size (uncached, about
    0.12 ms of the 0.33 ms a 128x128 image's analysis takes, on the event loop)."""
    pos = tiling.positions(lr_h, lr_w, tiling_mode)
    weight, fill = patch_pixel_weights(pos, (out_h, out_w))
    for a in (pos, weight, fill):
        a.flags.writeable = False
    return pos, weight, fill


@dataclass
class PatchGroup:
    """The patches of one request that share a rung."""

    rung: int
    index: np.ndarray  # (n,) patch indices into the plan
    patches: torch.Tensor  # (n, 3, 32, 32) float32 in [0, 1]


class ArmSR:
    """A loaded ARM model: dense subnets per width, bicubic as rung 0, and its table."""

    def __init__(self, backbone: Backbone, full_state: dict[str, torch.Tensor], table: EdgeTable | None,
                 name: str = "", device: str = "cpu", max_batch: int = 256, interpolate_table: bool = True,
                 meta: dict | None = None) -> None:
        self.backbone, self.table, self.device = backbone, table, torch.device(device)
        self.full_state = full_state  # the supernet's tensors, for compressed rungs made from it
        self.compressed: dict[str, dict] = {}  # manifest entry of each compressed rung, by name
        self.name = name or f"arm-{backbone.name}"
        self.max_batch = max_batch
        self.interpolate_table = interpolate_table
        self.meta = meta or {}
        self.source: Path | None = None  # the checkpoint file, when loaded from one (its folder holds the rungs' manifests)
        # Channels-last is measurably faster for these small convolutions on CPU (oneDNN).
        self.subnets = [extract_subnet(backbone, full_state, w).to(self.device, memory_format=torch.channels_last)
                        for w in backbone.widths]
        self._clamps_itself = [_clamp_in_last_layer(net) for net in self.subnets]
        # each activation and the output clip computed inside its convolution's kernel (CPU)
        example = torch.rand(2, 3, tiling.PATCH, tiling.PATCH, device=self.device).contiguous(
            memory_format=torch.channels_last)
        self.subnets = [fuse_conv_activations(net, example) for net in self.subnets]
        plain = [backbone.build(w) for w in backbone.widths]  # FLOPs/params in the paper's form
        self.rungs = [Rung(0, "bicubic", 0, 0, 0)] + [
            Rung(i + 1, f"w{w}", w, official_flops(net), sum(p.numel() for p in net.parameters() if p.requires_grad))
            for i, (w, net) in enumerate(zip(backbone.widths, plain))]
        self.cost = np.array([r.flops_per_patch for r in self.rungs], dtype=np.float64)
        if table is not None and table.rungs != len(self.rungs):
            raise ValueError(f"table has {table.rungs} rungs, model has {len(self.rungs)}")

    @property
    def top(self) -> int:
        """The full-width fp32 rung: the best quality, which budgets are fractions of."""
        return len(self.backbone.widths)

    def add_compressed(self, precision: str, nets: dict[int, nn.Module], mse_ratio: dict[int, np.ndarray],
                       manifests: dict[str, dict] | None = None) -> None:
        """Append a ``precision`` rung ("int8", "bf16") per width in ``nets``, after the rungs
        already there so their indices keep their meaning.

        Its table row is its fp32 width's row times ``mse_ratio[width]`` (per bin, the rung's
        mean squared error over the fp32 width's): a quantization's damage carries over to a
        table measured on other photos, as an official checkpoint's is.  ``manifests``: each
        rung's manifest entry by name (method, held-out quality, command), kept in
        ``compressed``.  int8 rungs run on torch's CPU int8 kernels only."""
        if precision == "int8" and self.device.type != "cpu":
            return
        for width, net in sorted(nets.items()):
            fp32 = self.rungs[self.backbone.widths.index(width) + 1]
            index, name = len(self.rungs), f"{fp32.name}-{precision}"
            self.rungs.append(Rung(index, name, width, fp32.flops_per_patch, fp32.params, precision))
            self.subnets.append(net.to(self.device))
            self._clamps_itself.append(_clamps_in_graph(net) if precision == "int8" else _clamp_in_last_layer(net))
            self.compressed[name] = (manifests or {}).get(name, {})
            if self.table is not None:
                self.table = self.table.with_scaled_row(fp32.index, mse_ratio[width])
        self.cost = np.array([r.flops_per_patch for r in self.rungs], dtype=np.float64)

    def add_bf16(self) -> None:
        """Add the bf16 rungs ``models.arm.bf16`` builds (where the backbone has them and the
        device multiplies bf16 natively; their table rows estimated on shipped photos)."""
        from models.arm import bf16

        if self.table is not None and bf16.available(self.backbone.name, self.device):
            self.add_compressed("bf16", *bf16.build(self))

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path, backbone: str | None = None, table: str | Path | None = None,
                        require_table: bool = True, int8: bool | str | Path = False, bf16: bool = False,
                        **kw) -> ArmSR:
        """Our ``model.safetensors`` (with ``manifest.json`` beside it) or an official
        ``arm-<backbone>.pth`` (with ``arm-<backbone>.state`` or a table JSON beside it).
        ``table`` names a table JSON explicitly; ``require_table=False`` loads without one
        (for building a table).  ``int8``: add the int8 rungs ``models.arm.quantize`` trained
        beside the checkpoint (True) or into that folder (a path); False (the default, so
        tools that build tables or evaluate widths see the fp32 ladder): none.  ``bf16``: add
        the bf16 rungs (``add_bf16``) after the int8 ones."""
        path = Path(path)
        state = load_full_state(path)
        manifest_path = path.with_name("manifest.json")
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        name = backbone or manifest.get("backbone") or _backbone_from_keys(state)
        if table is not None:
            found: EdgeTable | None = EdgeTable.from_json(table)
        else:
            try:
                found = _find_table(path, manifest, name)
            except FileNotFoundError:
                if require_table:
                    raise
                found = None
        model = cls(get_backbone(name), state, found, name=manifest.get("name", path.stem), meta=manifest, **kw)
        model.source = path
        if int8 is not False and found is not None:
            from models.arm.quantize import load_int8

            model.add_compressed("int8", *load_int8(model.backbone, state, path.parent if int8 is True else Path(int8)))
        if bf16:
            model.add_bf16()
        return model

    # --- planning -----------------------------------------------------------------------

    def analyse(self, lr_u8: np.ndarray, tiling_mode: tiling.Tiling = "full",
                interpolate: bool | None = None) -> Analysis:
        """Tiles, edge scores and the table's predictions for a uint8 RGB LR image: the
        part of planning that does not depend on the budget, so a planner searching over
        budgets pays for it once.  ``interpolate`` overrides the model's table look-up
        (False: official nearest bin)."""
        if self.table is None:
            raise RuntimeError(f"{self.name} has no lookup table; build one with python -m models.arm.build_table")
        h, w = lr_u8.shape[:2]
        img = tiling.pad_to_patch(lr_u8)
        pos, pixel_weight, fill_weight = tile_layout(img.shape[0], img.shape[1], SCALE * h, SCALE * w, tiling_mode)
        scores = edge_scores_gray(tiling.extract(gray_u8(img), pos))  # gray once per image, not per patch
        interp = self.interpolate_table if interpolate is None else interpolate
        return Analysis(pos, scores, self.table.predict_psnr(scores, interp), self.table.predict_mse(scores, interp),
                        img.shape[:2], (SCALE * h, SCALE * w), tiling_mode, pixel_weight, fill_weight)

    def choose(self, a: Analysis, *, mode: Mode = "budget", budget: float = 1.0, objective: Objective = "mse",
               rung: int | None = None, eta: float | None = None,
               times: dispatch.RungTimes | None = None) -> Plan:
        """One rung per tile of an analysed image; costs microseconds to milliseconds.

        mode ``budget``: total FLOPs <= budget x full width, choosing by ``objective``
        (``mse``: minimise predicted squared error; ``psnr_sum``: the paper's eta rule at
        the largest eta that fits).  ``best``: the table's best rung per tile.  ``fixed``:
        ``rung`` everywhere.  ``eta``: the paper's rule with eta = ``eta`` x full cost.
        ``seconds``: minimise predicted squared error with the predicted forward time at most
        ``budget`` x that of the whole image at full width, on the host ``times`` describes
        (``dispatch.min_error_within_seconds``)."""
        psnr, mse = a.pred_psnr, a.pred_mse
        info: dict = {"mode": mode}
        if mode == "seconds":
            if times is None or not 0.0 <= budget <= 1.0:
                raise ValueError("seconds mode needs times and a budget in [0, 1]")
            top = times.seconds(np.full(len(mse), self.top))
            rungs = a.seconds_dispatch(times).solve(budget * top)
            info["predicted_s"] = times.seconds(rungs)
            info["predicted_s_full"] = top
        elif mode == "budget":
            if not 0.0 <= budget <= 1.0:
                raise ValueError(f"budget must be in [0, 1], got {budget}")
            if objective == "mse":
                sol = dispatch.min_error_under_budget(mse, self.cost, budget)
                rungs = sol.rungs
                info["optimality_gap_db"] = sol.gap_db
            elif objective == "psnr_sum":
                rungs, eta_found = dispatch.eta_for_budget(psnr, self.cost, budget)
                info["eta_k"] = eta_found / self.cost[-1]
            else:
                raise ValueError(f"unknown objective {objective!r}; use 'mse' or 'psnr_sum'")
            info["objective"] = objective
        elif mode == "best":
            rungs = dispatch.best_rule(psnr)
        elif mode == "fixed":
            if rung is None or not 0 <= rung < len(self.rungs):
                raise ValueError(f"fixed mode needs a rung in 0..{len(self.rungs) - 1}, got {rung}")
            rungs = np.full(len(a.positions), rung, dtype=np.int64)
        elif mode == "eta":
            if eta is None or eta <= 0:
                raise ValueError("eta mode needs eta > 0 (in units of the full-width cost)")
            rungs = dispatch.eta_rule(psnr, self.cost, eta * self.cost[-1])
            info["eta_k"] = eta
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return self._plan(a, rungs, budget if mode == "budget" else None, info)

    def _plan(self, a: Analysis, rungs: np.ndarray, budget: float | None, info: dict) -> Plan:
        rungs = np.asarray(rungs, dtype=np.int64)
        n = len(a.positions)
        return Plan(a.positions, rungs, a.scores, a.pred_mse[np.arange(n), rungs], float(self.cost[rungs].sum()),
                    float(self.cost[-1] * n), a.lr_hw, a.out_hw, a.tiling, budget, info,
                    a.pixel_weight, a.fill_weight, a.pred_mse[:, 0])

    def faster_within(self, a: Analysis, plan: Plan, seconds: Callable[[np.ndarray], float],
                      slack_db: float) -> Plan:
        """``plan`` (a budget plan of the ``mse`` objective) or, if one is predicted faster, the
        plan of the same FLOPs budget within ``slack_db`` of its predicted quality that takes
        the fewest ``seconds(rungs)`` (``dispatch.fastest_within``).  Other plans pass
        through: a fixed rung or the paper's rule is what its caller asked for."""
        if plan.budget is None or plan.info.get("objective") != "mse" or slack_db <= 0:
            return plan
        rungs = dispatch.fastest_within(a.pred_mse, self.cost, plan.budget, seconds, slack_db)
        if np.array_equal(rungs, plan.rungs):
            return plan
        info = {**plan.info, "time_slack_db": slack_db, "predicted_s_saved": seconds(plan.rungs) - seconds(rungs)}
        return self._plan(a, rungs, plan.budget, info)

    def plan(self, lr_u8: np.ndarray, *, tiling_mode: tiling.Tiling = "full", interpolate: bool | None = None,
             **choose_kw) -> Plan:
        """Decide a rung per tile of a uint8 RGB LR image (``analyse`` then ``choose``, whose
        keywords it takes); no network runs here."""
        return self.choose(self.analyse(lr_u8, tiling_mode, interpolate), **choose_kw)

    # --- execution ----------------------------------------------------------------------

    @torch.inference_mode()
    def run_patches(self, rung: int, lr: torch.Tensor) -> torch.Tensor:
        """SR of a batch (n, 3, 32, 32) float [0,1] at one rung, clamped to [0, 1].

        Returned channels-last (NHWC memory), the layout the subnets produce and
        ``assemble`` reads without a copy."""
        if rung == 0:
            return bicubic_upscale(lr).clamp_(0, 1)
        net = self.subnets[rung - 1]
        out = net(lr.contiguous(memory_format=torch.channels_last))
        return out if self._clamps_itself[rung - 1] else out.clamp_(0, 1)

    # The serving runtime batches across requests, so execution is split in three:
    # ``prepare`` (per request: patches grouped by rung), ``run_patches`` (per batch, any
    # mix of requests that share a rung) and ``assemble`` (per request: stitch).  ``run``
    # chains them for one request.

    def prepare(self, plan: Plan, lr_float: np.ndarray) -> list[PatchGroup]:
        """The plan's LR patches grouped by rung, ready for ``run_patches``.

        Each group is cut straight from the (H, W, 3) image, so its (n, 32, 32, 3) array
        viewed as NCHW is already channels-last: no transposition before the network."""
        img = tiling.pad_to_patch(lr_float.astype(np.float32, copy=False))
        groups = []
        for r in np.unique(plan.rungs).tolist():
            idx = np.flatnonzero(plan.rungs == r)
            patches = torch.from_numpy(tiling.extract(img, plan.positions[idx])).permute(0, 3, 1, 2)
            groups.append(PatchGroup(r, idx, patches.to(self.device)))
        return groups

    def assemble(self, plan: Plan, lr_float: np.ndarray, groups: list[PatchGroup], outputs: list[torch.Tensor],
                 quantize_patches: bool | None = None) -> np.ndarray:
        """Stitch the SR patches (``outputs[i]`` for ``groups[i]``) into the x4 canvas
        (4H, 4W, 3) float32 in [0, 1].

        ``quantize_patches`` rounds each patch to 8 bits before stitching, as the official
        code does (default: only in official tiling, to reproduce its numbers)."""
        if quantize_patches is None:
            quantize_patches = plan.tiling == "official"
        acc = tiling.Canvas((SCALE * plan.lr_hw[0], SCALE * plan.lr_hw[1]))
        for group, sr in zip(groups, outputs):
            sr = sr.detach().cpu().numpy()  # any layout; channels-last (run_patches') is read without a copy
            if quantize_patches:
                sr = np.round(sr * 255) / 255
            acc.add(sr, plan.positions[group.index])
        canvas = acc.result()[: plan.out_hw[0], : plan.out_hw[1]]
        ch, cw = (SCALE * v for v in tiling.covered_hw(plan.positions))
        if ch < canvas.shape[0] or cw < canvas.shape[1]:
            # Official tiling leaves the right/bottom remainder uncovered; give it bicubic
            # so the image is whole (the covered area, which the paper scores, is unchanged).
            img = tiling.pad_to_patch(lr_float.astype(np.float32, copy=False))
            fill = F.interpolate(torch.from_numpy(img[: plan.out_hw[0] // SCALE, : plan.out_hw[1] // SCALE])
                                 .permute(2, 0, 1)[None], scale_factor=SCALE, mode="bicubic",
                                 align_corners=False).clamp_(0, 1)[0].permute(1, 2, 0).numpy()
            canvas[ch:], canvas[:, cw:] = fill[ch:], fill[:, cw:]
        return canvas

    def run(self, plan: Plan, lr_float: np.ndarray, quantize_patches: bool | None = None) -> np.ndarray:
        """Execute a plan on the LR image (H, W, 3) float32 in [0, 1]; returns the x4
        canvas (4H, 4W, 3) float32 in [0, 1].  Each rung runs in batches of ``max_batch``."""
        groups = self.prepare(plan, lr_float)
        outputs = [torch.cat([self.run_patches(g.rung, g.patches[i:i + self.max_batch])
                              for i in range(0, len(g.patches), self.max_batch)]) for g in groups]
        return self.assemble(plan, lr_float, groups, outputs, quantize_patches)

    def upscale(self, lr_u8: np.ndarray, **plan_kw) -> tuple[np.ndarray, Plan]:
        """Convenience: plan and run on a uint8 RGB image; returns (uint8 x4 image, plan)."""
        plan = self.plan(lr_u8, **plan_kw)
        canvas = self.run(plan, lr_u8.astype(np.float32) / 255.0)
        return np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8), plan


def _clamps_in_graph(net: nn.Module) -> bool:
    """Whether a traced (int8) network's output shuffle clips to [0, 1] itself."""
    graph = getattr(net, "graph", None)
    return graph is not None and any(
        node.op == "call_function" and getattr(node.target, "__name__", "") == "sub_pixel_shuffle"
        and node.args[3] == (0.0, 1.0) for node in graph.nodes)


def _clamp_in_last_layer(net: nn.Module) -> bool:
    """Have an FSRCNN subnet clip its output to [0, 1] in the shuffle of its last layer, so
    ``run_patches`` needs no separate clamp pass over the HR output.  True if it does."""
    if isinstance(net, FSRCNN) and isinstance(net.tail_conv, SubPixelDeconv):
        if net.tail_conv.clips is None:
            net.tail_conv.clamp = (0.0, 1.0)
        return net.tail_conv.clips == (0.0, 1.0)
    return False


@functools.lru_cache(maxsize=16)
def _bicubic_matrix(n_in: int, scale: int, device: torch.device) -> torch.Tensor:
    """(scale * n_in, n_in) float32 matrix of PyTorch's 1-D bicubic upsampling
    (``F.interpolate(mode="bicubic", align_corners=False)``: a = -0.75, source position
    (o + 0.5) / scale - 0.5, indices clamped at the borders), weights rounded once from
    float64."""
    a = -0.75
    out = np.arange(scale * n_in)
    src = (out + 0.5) / scale - 0.5
    base = np.floor(src).astype(np.int64)
    t = src - base
    taps = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,  # distance 1 + t
            ((a + 2) * t - (a + 3)) * t * t + 1,  # distance t
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,  # distance 1 - t
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]  # distance 2 - t
    m = np.zeros((scale * n_in, n_in))
    for k, w in enumerate(taps):
        np.add.at(m, (out, np.clip(base - 1 + k, 0, n_in - 1)), w)
    with torch.inference_mode(False):  # cached: an ordinary tensor, usable outside inference mode too
        return torch.from_numpy(m.astype(np.float32)).to(device)


def bicubic_upscale(lr: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """``F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)`` as two
    matrix products (columns, then rows), returned channels-last.

    The same linear map (to float rounding: max |diff| ~4e-7 on [0, 1] images), computed
    as one plain GEMM per pass: the whole batch is laid out so the summed axis leads
    ((w, n*h*c), then (h, n*4w*c)), and the (4n, n) matrix multiplies it at once.  The
    earlier form, a batched product of n*h small matrices, ran 2.4x slower in-process and,
    in the server's scheduler thread, 10 ms instead of 0.8 ms for the column pass of 25
    patches (MKL's small-matrix batch path; docs/BENCHMARKS.md 1.3).  PyTorch's bicubic
    kernel computes 16 taps per output pixel and is slower still.  Meant for patch-sized
    inputs; the dense matrices make whole large images quadratic in their side."""
    n, c, h, w = lr.shape
    x = lr.permute(3, 0, 2, 1).reshape(w, n * h * c)  # (w, [n, h, c]); a copy of the small input
    cols = _bicubic_matrix(w, scale, lr.device) @ x  # (scale*w, [n, h, c])
    y = cols.view(scale * w, n, h, c).permute(2, 1, 0, 3).reshape(h, n * scale * w * c)  # (h, [n, scale*w, c])
    rows = _bicubic_matrix(h, scale, lr.device) @ y  # (scale*h, [n, scale*w, c])
    out = rows.view(scale * h, n, scale * w, c).permute(1, 3, 0, 2)
    return out.contiguous(memory_format=torch.channels_last)


def _backbone_from_keys(state: dict[str, torch.Tensor]) -> str:
    if "tail_conv.weight" in state:
        return "fsrcnn"
    if "entry.weight" in state:
        return "carn"
    if "conv_first.weight" in state:
        return "srresnet"
    raise ValueError("cannot tell the ARM backbone from the checkpoint keys; pass backbone=")


def _find_table(weights: Path, manifest: dict, backbone: str) -> EdgeTable:
    """The table beside the weights: manifest 'table', ``<stem>.state``, ``<stem>.table.json``,
    or an official JSON export (``arm_lut_official.json``) holding this backbone."""
    if "table" in manifest:
        return EdgeTable.from_dict(manifest["table"])
    state = weights.with_suffix(".state")
    if state.exists():
        return EdgeTable.from_official_hmap(load_official_state_table(state), source=str(state))
    own = weights.with_suffix(".table.json")
    if own.exists():
        return EdgeTable.from_json(own)
    export = weights.with_name("arm_lut_official.json")
    if export.exists():
        d = json.loads(export.read_text())[backbone]
        return EdgeTable(np.asarray(d["x_centers"]), np.asarray(d["psnr_mean"]), np.asarray(d["cost_list"]),
                         np.asarray(d["count"]), source=str(export))
    raise FileNotFoundError(
        f"no lookup table found for {weights}: expected a manifest.json with 'table', "
        f"{state.name}, {own.name}, or arm_lut_official.json beside it "
        f"(build one with: python -m models.arm.build_table --checkpoint {weights})")
