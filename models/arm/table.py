"""ARM's Edge->PSNR lookup table: per edge-score bin, the expected PSNR of every rung.

Rung 0 is bicubic, rungs 1..R-1 the subnet widths.  The official table stores only the
mean PSNR per bin; our own tables also store the mean squared error per bin, because an
image's PSNR is set by its *total* squared error and the mean of per-patch PSNRs
(a geometric mean of MSE) underestimates the mean MSE of a bin.  Empty bins, which the
official code leaves as NaN (and ``argmax`` then picks), are filled by interpolation
along the edge axis from their neighbours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PEAK = 255.0


def psnr_to_mse(psnr: np.ndarray) -> np.ndarray:
    return PEAK**2 * np.power(10.0, -np.asarray(psnr, dtype=np.float64) / 10.0)


def mse_to_psnr(mse: np.ndarray | float) -> np.ndarray:
    mse = np.maximum(np.asarray(mse, dtype=np.float64), 1e-10)
    return 10.0 * np.log10(PEAK**2 / mse)


def _fill_empty(rows: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Replace NaN entries of each row by linear interpolation over the bin centres
    (constant beyond the first/last filled bin)."""
    rows = np.array(rows, dtype=np.float64)
    for r in rows:
        ok = np.isfinite(r)
        if not ok.any():
            raise ValueError("a table row has no filled bin at all")
        if not ok.all():
            r[~ok] = np.interp(centers[~ok], centers[ok], r[ok])
    return rows


@dataclass
class EdgeTable:
    """x_centers (B,), psnr (R, B), optional mse (R, B), counts (B,), cost (R,) FLOPs per
    patch in the official convention (cost[0] = 0 for bicubic)."""

    x_centers: np.ndarray
    psnr: np.ndarray
    cost: np.ndarray
    counts: np.ndarray | None = None
    mse: np.ndarray | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.x_centers = np.asarray(self.x_centers, dtype=np.float64)
        self.cost = np.asarray(self.cost, dtype=np.float64)
        self.psnr = _fill_empty(self.psnr, self.x_centers)
        if self.mse is not None:
            self.mse = _fill_empty(self.mse, self.x_centers)
        if self.psnr.shape != (len(self.cost), len(self.x_centers)):
            raise ValueError(f"table psnr has shape {self.psnr.shape}, expected "
                             f"({len(self.cost)}, {len(self.x_centers)})")

    @property
    def rungs(self) -> int:
        return len(self.cost)

    def bins(self, scores: np.ndarray) -> np.ndarray:
        """Nearest bin centre (ties to the lower index; out-of-range clamps), as official."""
        d = np.abs(self.x_centers[None, :] - np.asarray(scores, dtype=np.float64)[:, None])
        return np.argmin(d, axis=1)

    def predict_psnr(self, scores: np.ndarray, interpolate: bool = False) -> np.ndarray:
        """(N, R) predicted PSNR: the official nearest-bin value, or linear interpolation
        between neighbouring bin centres."""
        if not interpolate:
            return self.psnr[:, self.bins(scores)].T.copy()
        return np.stack([np.interp(scores, self.x_centers, row) for row in self.psnr], axis=1)

    def predict_mse(self, scores: np.ndarray, interpolate: bool = False) -> np.ndarray:
        """(N, R) predicted squared error per pixel (0..255 scale).  Uses the stored bin
        mean MSE where the table has it, else the MSE implied by the bin's mean PSNR."""
        if self.mse is None:
            return psnr_to_mse(self.predict_psnr(scores, interpolate))
        if not interpolate:
            return self.mse[:, self.bins(scores)].T.copy()
        return np.stack([np.interp(scores, self.x_centers, row) for row in self.mse], axis=1)

    def with_scaled_row(self, rung: int, mse_ratio: np.ndarray) -> EdgeTable:
        """This table plus one row: ``rung``'s row with its squared error scaled per bin by
        ``mse_ratio`` (B,) (the new rung costs what ``rung`` costs in FLOPs)."""
        ratio = np.asarray(mse_ratio, dtype=np.float64)
        if ratio.shape != self.x_centers.shape:
            raise ValueError(f"a row of {ratio.shape} for a table of {len(self.x_centers)} bins")
        base_mse = self.mse[rung] if self.mse is not None else psnr_to_mse(self.psnr[rung])
        psnr_row = self.psnr[rung] - 10.0 * np.log10(ratio)
        mse = None if self.mse is None else np.vstack([self.mse, base_mse * ratio])
        return EdgeTable(self.x_centers, np.vstack([self.psnr, psnr_row]), np.append(self.cost, self.cost[rung]),
                         self.counts, mse, self.source, self.meta)

    # --- construction and files -------------------------------------------------------

    @classmethod
    def build(cls, scores: np.ndarray, psnr: np.ndarray, mse: np.ndarray, cost: np.ndarray,
              bins: int = 30, source: str = "", meta: dict | None = None) -> EdgeTable:
        """From per-patch edge scores (N,) and per-rung patch PSNR and MSE (N, R), with the
        official binning: ``bins`` equal-width bins between the min and max score."""
        scores = np.asarray(scores, dtype=np.float64)
        edges = np.linspace(scores.min(), scores.max(), bins + 1)
        idx = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, bins - 1)
        counts = np.bincount(idx, minlength=bins).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = lambda v: np.stack([np.bincount(idx, weights=v[:, r], minlength=bins) / counts  # noqa: E731
                                       for r in range(v.shape[1])])
            psnr_rows, mse_rows = mean(np.asarray(psnr)), mean(np.asarray(mse))
        centers = edges[:-1] + (edges[1] - edges[0]) / 2
        return cls(centers, psnr_rows, cost, counts, mse_rows, source, meta or {})

    @classmethod
    def from_official_hmap(cls, hmap: dict, source: str = "") -> EdgeTable:
        """From the ``hmap`` of an official ``.state``: bin centres, mean PSNR per bin, costs
        and patch counts.  (Its 2-D edge x PSNR histograms could give a bin's mean MSE, but
        only to the 2.6 dB resolution of their PSNR bins; measured, that predictor chose
        worse than the MSE implied by the mean PSNR, so it is not used.)"""
        counts = np.asarray(hmap["hmap_list"][0], dtype=np.float64).sum(axis=1) if "hmap_list" in hmap else None
        return cls(np.asarray(hmap["hmap_x_list"][0]), np.stack(hmap["hmap_y_mean_list"]),
                   np.asarray(hmap["cost_list"]), counts, None, source)

    def to_dict(self) -> dict:
        out = {"x_centers": self.x_centers.tolist(), "psnr_mean": self.psnr.tolist(),
               "cost_list": self.cost.tolist(), "source": self.source, "meta": self.meta}
        if self.counts is not None:
            out["count"] = np.asarray(self.counts).tolist()
        if self.mse is not None:
            out["mse_mean"] = self.mse.tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> EdgeTable:
        return cls(np.asarray(d["x_centers"]), np.asarray(d["psnr_mean"]), np.asarray(d["cost_list"]),
                   np.asarray(d["count"]) if "count" in d else None,
                   np.asarray(d["mse_mean"]) if "mse_mean" in d else None,
                   d.get("source", ""), d.get("meta", {}))

    @classmethod
    def from_json(cls, path: str | Path) -> EdgeTable:
        return cls.from_dict(json.loads(Path(path).read_text()))
