"""The CF-ViT model as the serving runtime sees it (no web framework here).

    m = CfVitModel.from_checkpoint("models/cfvit/weights/cf-tiny-glyphs/model.safetensors")
    x = torch.stack([m.preprocess(rgb) for rgb in images])          # (n, 3, S, S)
    eta = torch.full((len(x),), m.eta_for_budget(0.6))
    logits, exited, confidence = m.forward(x, eta)
    spent = m.flops_for(exited)                                       # per row, MACs

Costs are in CF-ViT's own unit: multiply-accumulates (the paper's and the checkpoints'
"FLOPs"; 1.10e9 coarse and 4.01e9 full for DeiT-S 7x7).  ``curve`` is the validation eta curve
(our manifest's, or for an official checkpoint the authors' ImageNet-val arrays stored in it),
a list of {eta, exit_rate, expected_flops, accuracy}; :meth:`eta_for_budget` picks from it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.cfvit.bf16 import run_bf16
from models.cfvit.checkpoint import load_checkpoint, official_curve
from models.cfvit.engines import StageRunners
from models.cfvit.model import ALL_FINE, CfVisionTransformer, CfVitConfig, count_macs
from models.cfvit.preprocess import eval_transform, load_class_names, resize_pixels
from models.common.engines import TORCH, TORCH_NAMES

FLOPS_CONVENTION = "MACs (CF-ViT/fvcore 'FLOPs')"
# choose_engines measures no batch whose all-fine pass would take longer, by n x a one-image
# pass (an overestimate: a batch costs less per image); the bundled model's 128 take about 0.3 s
ENGINE_PASS_LIMIT_S = 2.0


class CfVitModel:
    flops_convention = FLOPS_CONVENTION

    def __init__(self, net: CfVisionTransformer, *, name: str, classes: list[str], curve: list[dict],
                 curve_dense: list[dict] | None = None, source: str = "ours", meta: dict | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.net = net.eval().to(device)
        self.device = torch.device(device)
        self.config: CfVitConfig = net.cfg
        self.name = name
        self.classes = list(classes)
        if len(self.classes) != self.config.num_classes:
            raise ValueError(f"{len(self.classes)} class names for {self.config.num_classes} classes")
        macs = count_macs(self.config)
        self.flops_coarse = int(macs.coarse)
        self.flops_fine_increment = int(macs.fine_increment)
        self.flops_full = int(macs.full)
        self.curve = sorted(curve, key=lambda p: p["eta"])
        self._budget_curve = sorted(curve_dense or curve, key=lambda p: p["eta"])
        self.source = source
        self.meta = meta or {}
        # the int8 version (python -m models.cfvit.quantize): its network (CPU) and its int8.json
        self.int8_net: CfVisionTransformer | None = None
        self.int8_meta: dict | None = None
        # the bf16 version (python -m models.cfvit.bf16): the network with bf16 weights under
        # bf16 autocast, served where the device multiplies bf16 natively; its bf16.json
        self.bf16_net: CfVisionTransformer | None = None
        self.bf16_meta: dict | None = None
        # the images OpenVINO's int8 graphs are quantized from (the bundle's
        # int8_calibration.safetensors, where int8.json holds their quality); None: no such graphs
        self.int8_calibration: torch.Tensor | None = None
        # precision -> what runs its stages on the faster engine (``choose_engines``); none: torch
        self.runners: dict[str, StageRunners] = {}

    def load_int8(self, path: str | Path) -> bool:
        """Build the int8 network a bundle's ``int8.json`` describes (dynamic int8 linears and,
        with the bundle's stored ranges, a static int8 stem: a fraction of a second, no data).
        CPU only; False without one."""
        from models.cfvit.quantize import int8_network, load_engine_calibration, load_int8, load_stem_ranges

        meta = load_int8(path)
        if meta is None or self.device.type != "cpu":
            return False
        self.int8_net, self.int8_meta = int8_network(self.net, load_stem_ranges(path)), meta
        if "openvino" in meta.get("engine_quality", {}):
            self.int8_calibration = load_engine_calibration(path)
        return True

    def choose_engines(self, engine: str = "auto", sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
                       rounds: int = 5) -> dict[str, StageRunners]:
        """Run each stage of the fp32 network on the fastest of torch, ONNX Runtime and
        OpenVINO (those installed) at each batch size, and each stage of the int8 and bf16
        versions on the faster of torch's and OpenVINO's (where the bundle holds the quality of
        OpenVINO's: ``python -m models.cfvit.quantize``, ``python -m models.cfvit.bf16``),
        measured now on the calling thread with its thread count: call it on the thread that
        will serve (``models.cfvit.engines``).  ``engine``: "auto", "torch", or one engine at
        every size ("onnxruntime": fp32 only).  CPU only.  Sizes whose all-fine pass on torch
        would take over ``ENGINE_PASS_LIMIT_S`` are not measured (larger batches take the
        choice of the largest size measured): an official DeiT-S takes about 0.1 s an image
        here, and three engines at batch 128 would add minutes to its start-up."""
        from models.cfvit.engines import float_graphs, serve_reduced_stages, serve_stages
        from models.cfvit.quantize import probe_images

        self.runners = {}
        if engine == "torch" or self.device.type != "cpu":
            return self.runners
        example = torch.randn(max(sizes), 3, self.input_size, self.input_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            for _ in range(2):  # the second pass, warm
                t0 = time.perf_counter()
                self.net.forward_exit(example[:1], ALL_FINE)
                one = time.perf_counter() - t0
        sizes = [n for n in sizes if n == 1 or n * one <= ENGINE_PASS_LIMIT_S]
        example = example[:max(sizes)]
        graphs = float_graphs(self.net, example)  # exported once for every precision
        self.runners["fp32"] = serve_stages(self.net, example, sizes, engine, rounds, graphs)
        if self.int8_net is not None and self.int8_calibration is not None:
            measured = self.int8_meta["engine_quality"]["openvino"]
            self.runners["int8"] = serve_reduced_stages(self.net, self.int8_net, "int8", self.int8_calibration,
                                                        example, sizes, engine, rounds, graphs, measured.get("graph"))
        if self.bf16_net is not None and "openvino" in (self.bf16_meta or {}).get("engine_quality", {}):
            # any images to check the two bf16 versions' top-1 on: the int8 calibration, or synthetic photos
            check = self.int8_calibration if self.int8_calibration is not None else probe_images(self.preprocess, 128)
            self.runners["bf16"] = serve_reduced_stages(self.net, self.bf16_net, "bf16", check, example, sizes,
                                                        engine, rounds, graphs)
        return self.runners

    def served_engines(self, precision: str) -> set[str]:
        """The engines serving some stage of a version at some batch size."""
        runners = self.runners.get(precision)
        return runners.engines() if runners is not None else {TORCH_NAMES.get(precision, TORCH)}

    def load_bf16(self, path: str | Path) -> bool:
        """Serve the bf16 version a bundle's ``bf16.json`` measured, if this device multiplies
        bf16 natively (elsewhere it is emulated and slower than float32); False otherwise."""
        from compress.bf16 import native_bf16
        from models.cfvit.bf16 import bf16_network, load_bf16

        meta = load_bf16(path)
        if meta is None or not native_bf16(self.device):
            return False
        self.bf16_net, self.bf16_meta = bf16_network(self.net), meta
        return True

    def build_int8_estimated(self) -> None:
        """An int8 version for a checkpoint that has none measured (an official one): dynamic
        int8 linears, which need no data, with each stage's accuracy drop estimated on
        synthetic images (``models.cfvit.quantize.estimated_manifest``).  CPU only."""
        from models.cfvit.quantize import estimated_manifest, int8_network, probe_images

        if self.device.type != "cpu":
            return
        int8 = int8_network(self.net, None)
        self.int8_meta = estimated_manifest(self.net, int8, self._budget_curve, probe_images(self.preprocess))
        self.int8_net = int8

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, names_file: str | Path | None = None,
                        device: str | torch.device = "cpu", int8: bool = True, bf16: bool = True) -> CfVitModel:
        """Our ``model.safetensors`` (with ``manifest.json`` beside it) or an official ``.pth``.
        For official checkpoints the class names come from ``names_file`` (else ``class_<i>``)."""
        ck = load_checkpoint(path)
        cfg = ck.config
        if ck.source == "ours":
            man = ck.meta
            classes = load_class_names(names_file, cfg.num_classes) if names_file else man.get("classes") or \
                load_class_names(None, cfg.num_classes)
            ev = man.get("evaluation", {}).get("val", {})
            curve, dense = ev.get("eta_curve", []), ev.get("eta_curve_dense")
            name = man.get("name", cfg.name)
        else:
            classes = load_class_names(names_file, cfg.num_classes)
            curve = dense = official_curve(ck.meta, cfg)
            name = cfg.name
        model = cls(ck.model, name=name, classes=classes, curve=curve, curve_dense=dense, source=ck.source,
                    meta=ck.meta, device=device)
        if int8 and not model.load_int8(path) and ck.source == "official":
            model.build_int8_estimated()
        if bf16:
            model.load_bf16(path)
        return model

    # ---- inference ------------------------------------------------------------------------

    @property
    def input_size(self) -> int:
        return self.config.img_size

    def preprocess(self, rgb_u8: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, S, S) float32: resize the short side to int(S/crop_pct)
        (bicubic), centre crop S, normalise (ImageNet statistics for official checkpoints)."""
        c = self.config
        return eval_transform(rgb_u8, c.img_size, c.crop_pct, c.mean, c.std)

    def preprocess_pixels(self, w: int, h: int) -> int:
        """Pixels of the largest intermediate ``preprocess`` makes for a w x h image (from
        the size alone: a server checks it from the header, before decoding)."""
        c = self.config
        return resize_pixels(w, h, int(c.img_size / c.crop_pct), c.img_size)

    def forward(self, batch: torch.Tensor, eta: torch.Tensor | float, int8: bool = False,
                bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, 3, S, S) and per-row thresholds (n,) -> (logits (n, C), exited (n,) bool,
        coarse confidence (n,) float32).  Rows with confidence >= eta exit at the coarse stage;
        the fine stage runs on the others only.  eta > 1 forces the fine stage, 0 the coarse.
        ``int8``: on the int8 network (``load_int8``; CPU).  ``bf16``: on the bf16 network under
        bf16 autocast (``load_bf16``)."""
        net = self.int8_net if int8 else self.bf16_net if bf16 else self.net
        runners = self.runners.get("int8" if int8 else "bf16" if bf16 else "fp32")
        if net is None:
            raise RuntimeError(f"{self.name} has no {'int8' if int8 else 'bf16'} network "
                               f"(python -m models.cfvit.{'quantize' if int8 else 'bf16'})")
        device = torch.device("cpu") if int8 else self.device
        with torch.inference_mode(), run_bf16(device) if bf16 and not int8 else contextlib.nullcontext():
            x = batch.to(device, torch.float32)
            eta_t = torch.as_tensor(eta, dtype=torch.float32, device=device)
            eta_t = eta_t.expand(x.shape[0]) if eta_t.ndim == 0 else eta_t
            out = runners.forward_exit(net, x, eta_t) if runners is not None else net.forward_exit(x, eta_t)
            return out.logits.float(), out.exited, out.confidence.float()

    __call__ = forward

    def flops_for(self, exited: torch.Tensor) -> torch.Tensor:
        """MACs spent per row: coarse for exited rows, coarse + fine increment otherwise."""
        return torch.where(exited.cpu(), self.flops_coarse, self.flops_full).to(torch.int64)

    # ---- budgets --------------------------------------------------------------------------

    def expected_flops(self, eta: float) -> float:
        """Expected MACs per image at ``eta`` on the validation curve (the nearest curve point
        at or below ``eta``; without a curve, the worst case)."""
        pts = [p for p in self._budget_curve if p["eta"] <= eta + 1e-9]
        return float(pts[-1]["expected_flops"]) if pts else float(self.flops_full)

    def eta_for_budget(self, fraction_of_full_flops: float) -> float:
        """The largest eta on the validation curve whose expected cost is at most
        ``fraction x flops_full``.  Non-decreasing in the fraction.  Below the all-coarse cost
        the answer is the smallest eta (everything exits); without a curve, 1.01 (all fine)
        when the budget covers the full cost, else 0."""
        budget = float(fraction_of_full_flops) * self.flops_full
        if not self._budget_curve:
            return 1.01 if fraction_of_full_flops >= 1.0 else 0.0
        best = self._budget_curve[0]["eta"]
        for p in self._budget_curve:
            if p["expected_flops"] <= budget * (1 + 1e-9):
                best = max(best, p["eta"])
        return float(best)
