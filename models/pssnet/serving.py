"""The PSS-Net model as the serving runtime sees it: a ladder of dense, BN-folded subnets.

``PssNetModel.from_checkpoint`` accepts

* our bundle (a folder, its ``manifest.json`` or its ``model.safetensors``): the shared
  supernet weights plus the stored BN statistics of every retained subnet; each rung is
  extracted, given *its own* statistics and folded at load time;
* our bundle's ``variants/``: dense MobileNetV1 networks made from it or trained beside it
  by other methods (CLR-RNF pruning, DCFF compact training; ``models.pssnet.dense_train``),
  each with its own held-out accuracy, served as rungs of the same ladder;
* an official ``checkpoint_*.pt``: each pool's top-1 cfg plus max_net and min_net.  Its BN
  buffers are not valid for any served subnet (every subnet writes into the same BN running
  buffers during training), so it needs calibration images (a folder, e.g. ImageNet train,
  processed with the official training transform) or ready-made batches; ``export_bundle``
  then writes our bundle so later loads need none.

Rungs are ordered by FLOPs (ascending).  Every rung's network is a plain module in eval
mode with no shared state, so ``forward`` may be called from several threads.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from models.common.engines import EngineChoice
from models.pssnet.calibrate import bn_stats, load_bn_stats, recalibrate_bn
from models.pssnet.checkpoint import load_bundle, load_official_checkpoint, save_bundle
from models.pssnet.data import MEAN, STD, folder_calibration_batches, resize_center_crop, resize_pixels, to_rgb_u8
from models.pssnet.nets import DenseSubnet, PssSupernet, SubnetConfig, SupernetSpec, extract_subnet, fold_bn
from models.pssnet.nets import count_params, subnet_flops, subnet_params


def load_variants(path: str | Path, spec: SupernetSpec) -> list[tuple[DenseSubnet, dict]]:
    """The dense variants in a bundle's ``variants/`` folder (each a sub-folder written by
    ``models.pssnet.dense_train.write_variant``), named after their folders."""
    from compress.artifact import bundle_dir
    from models.pssnet.dense_train import VARIANTS, load_variant

    root = bundle_dir(path) / VARIANTS
    out = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if (folder / "manifest.json").exists():
            net, manifest = load_variant(folder, spec)
            out.append((net, {**manifest, "name": folder.name}))
    return out


INT8_KEEP_FLOAT = ("features.0",)  # the stem convolution stays float in the torch.ao int8 rungs


@dataclass(frozen=True)
class PssRung:
    """One operating point.  ``flops`` in MFLOPs as PSS-Net counts them (MACs / 1e6, pool and
    FC included); ``accuracy`` is top-1 on the held-out test split and ``val_accuracy`` on
    val, from the manifest (None where not measured, e.g. an official checkpoint).
    ``dominated``: on val it is not measurably better than a cheaper rung (by less than
    ``DOMINANCE_MARGIN``), so the planner skips it: paying more FLOPs for a difference within
    sampling noise buys nothing a client could rely on."""

    index: int
    name: str
    cfg: dict
    flops: float
    params: int
    resolution: int
    accuracy: float | None
    val_accuracy: float | None
    pool: dict
    dominated: bool = False  # not DOMINANCE_MARGIN above every cheaper rung on val (False when unmeasured)
    method: str = "pss-net"  # a subnet of the supernet, or the method that made a dense variant
    variant: dict | None = None  # a variant's facts from its manifest: widths, seed, command, ...


# About the standard error of the accuracy difference of two subnets on 5000 val images
# (sqrt(p(1-p)/n) is 0.6 points at p = 0.8; paired errors make the difference's error smaller).
DOMINANCE_MARGIN = 0.005


def _read_class_names(path: str | Path | None, n: int) -> list[str]:
    if path is None:
        return [f"class_{i}" for i in range(n)]
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(names) != n:
        raise ValueError(f"{path} has {len(names)} class names, the model has {n} classes")
    return names


class PssNetModel:
    """A PSS-Net ladder.  Use ``from_checkpoint``."""

    def __init__(self, name: str, spec: SupernetSpec, classes: list[str], rungs: list[PssRung],
                 nets: list[DenseSubnet], preprocess_cfg: dict, stats: dict[str, dict[str, torch.Tensor]],
                 supernet: PssSupernet, manifest: dict) -> None:
        self.name, self.spec, self.classes, self.rungs = name, spec, classes, rungs
        # Served channels-last: oneDNN then runs the depth-wise and point-wise convolutions
        # without reordering every layer's input and output (1.4-1.55x faster at batch 32 on an
        # AMX CPU, python -m bench.memory_format; the same numbers to float rounding);
        # ``forward`` hands the batch over in it too.
        self._nets = [net.to(memory_format=torch.channels_last) for net in nets]
        self._pre = preprocess_cfg
        self._stats, self._supernet, self.manifest = stats, supernet, manifest
        self.input_size = int(preprocess_cfg["crop"])
        self._mean = torch.tensor(preprocess_cfg["mean"]).view(3, 1, 1)
        self._std = torch.tensor(preprocess_cfg["std"]).view(3, 1, 1)
        self.device = torch.device("cpu")
        # rung index -> (int8 module on the CPU, its artifact entry: quality, calibration, command)
        self.int8_rungs: dict[int, tuple[torch.nn.Module, dict]] = {}
        self._with_bn: dict[int, DenseSubnet] = {}  # a variant's network before BN folding
        # rung index -> its runner on the faster engine per batch size, and what was measured
        # (``choose_engines``); rungs without one run on torch
        self._runners: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.engine_choices: dict[int, EngineChoice] = {}
        # the same for the int8 rungs (torch.ao, or OpenVINO's int8 kernels), and the inputs
        # each int8 rung was calibrated on (``load_int8``), from which another engine's int8
        # graph is made
        self.int8_calibration: dict[int, torch.Tensor] = {}
        self._int8_runners: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.int8_engine_choices: dict[int, EngineChoice] = {}

    def to(self, device: str | torch.device) -> PssNetModel:
        """Serve every subnet on ``device``; ``forward`` moves its input there."""
        self.device = torch.device(device)
        self._nets = [net.to(self.device) for net in self._nets]
        return self

    # ---- loading ----

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, class_names: str | Path | None = None,
                        calibration: str | Path | Sequence[torch.Tensor] | None = None,
                        calib_batches: int = 9, calib_batch_size: int = 1024,
                        name: str | None = None, int8: bool = True, variants: bool = True) -> PssNetModel:
        """Our bundle, or an official ``.pt`` (then ``calibration`` is required: an image
        folder or a list of normalised N x 3 x S x S batches).  ``class_names``: a text
        file with one name per line (official checkpoints have none: ``class_<i>``)."""
        path = Path(path)
        if path.suffix == ".pt" or path.suffix == ".pth":
            return cls._from_official(path, class_names, calibration, calib_batches, calib_batch_size, name)
        bundle = load_bundle(path)
        m = bundle.manifest
        classes = _read_class_names(class_names, bundle.spec.num_classes) if class_names else list(
            m.get("classes") or _read_class_names(None, bundle.spec.num_classes))
        entries = [(r["name"], SubnetConfig.from_dict(r["cfg"]), r.get("pool", {}), r.get("accuracy") or {})
                   for r in m["rungs"]]
        found = load_variants(path, bundle.spec) if variants else []
        model = cls._build(name or m.get("name", path.stem), bundle.spec, bundle.supernet, classes, entries,
                           bundle.bn_stats, m["preprocess"], m, found)
        if int8:  # the bundle's int8 rungs (python -m models.pssnet.quantize), rebuilt from their calibration
            from models.pssnet.quantize import load_int8

            model.int8_rungs = load_int8(model, path)
        return model

    @classmethod
    def _from_official(cls, path: Path, class_names: str | Path | None,
                       calibration: str | Path | Sequence[torch.Tensor] | None, calib_batches: int,
                       calib_batch_size: int, name: str | None) -> PssNetModel:
        if calibration is None:
            raise ValueError(
                "an official PSS-Net checkpoint's BN buffers belong to whichever subnet ran last (every subnet "
                "writes into the same BN running buffers during training), so "
                "every served subnet needs its own statistics: pass calibration=<folder of training images> (or "
                "batches), or load a bundle written by export_bundle / python -m models.pssnet.export")
        ckpt = load_official_checkpoint(path)
        net = ckpt.build_supernet()
        if isinstance(calibration, (str, Path)):
            batches = folder_calibration_batches(calibration, calib_batches, calib_batch_size)
        else:
            batches = list(calibration)
        entries = [(rung, cfg, pool, {}) for rung, cfg, pool in ckpt.retained_subnets()]
        stats: dict[str, dict[str, torch.Tensor]] = {}
        for rung, cfg, _, _ in entries:
            dense = extract_subnet(net, cfg)
            recalibrate_bn(dense, batches)
            stats[rung] = bn_stats(dense)
        pre = {"kind": "imagenet", "resize": 256, "crop": 224, "mean": MEAN.flatten().tolist(),
               "std": STD.flatten().tolist()}
        classes = _read_class_names(class_names, ckpt.spec.num_classes)
        manifest = {"family": "pssnet", "name": name or f"pss-{ckpt.spec.model_name}-{path.stem}",
                    "source": {"official_checkpoint": path.name, "epoch": ckpt.epoch},
                    "bn": {"calibration": {"batches": len(batches), "batch_size": int(batches[0].shape[0]),
                                           "source": str(calibration) if isinstance(calibration, (str, Path))
                                           else "batches given by the caller",
                                           "augmentation": "official training transform"}},
                    "arch_pools": ckpt.arch_pools}
        return cls._build(manifest["name"], ckpt.spec, net, classes, entries, stats, pre, manifest)

    @classmethod
    def _build(cls, name: str, spec: SupernetSpec, supernet: PssSupernet, classes: list[str],
               entries: list[tuple[str, SubnetConfig, dict, dict]], stats: dict[str, dict[str, torch.Tensor]],
               pre: dict, manifest: dict, variants: Sequence[tuple[DenseSubnet, dict]] = ()) -> PssNetModel:
        built: list[tuple[PssRung, DenseSubnet, DenseSubnet | None]] = []  # (rung, folded net, net with BN)
        for rung, cfg, pool, acc in entries:
            if rung not in stats:
                raise ValueError(f"no BN statistics for rung {rung}: refusing to serve it on shared statistics")
            dense = extract_subnet(supernet, cfg)
            load_bn_stats(dense, stats[rung])
            built.append((PssRung(0, rung, cfg.to_dict(), round(subnet_flops(spec, cfg), 4), subnet_params(spec, cfg),
                                  cfg.resolution, acc.get("test"), acc.get("val"), dict(pool)),
                          fold_bn(dense.eval()), None))
        names = {r.name for r, _, _ in built}
        for net, m in variants:
            if m["name"] in names:
                raise ValueError(f"variant {m['name']!r} has the name of a rung of the bundle")
            acc = m.get("accuracy") or {}
            facts = {k: m[k] for k in ("widths", "seed", "keep", "sparsity", "source", "command", "date") if k in m}
            built.append((PssRung(0, m["name"], m["cfg"], m["mflops"], count_params(net), net.resolution,
                                  acc.get("test"), acc.get("val"), {}, method=m["method"], variant=facts),
                          fold_bn(copy.deepcopy(net)), net))
        built.sort(key=lambda b: b[0].flops)
        rungs = [replace(r, index=i) for i, (r, _, _) in enumerate(built)]
        nets = [n for _, n, _ in built]
        best_val = None
        for i, r in enumerate(rungs):  # judged on val, so that test stays a held-out number
            if r.val_accuracy is not None:
                if best_val is not None and r.val_accuracy < best_val + DOMINANCE_MARGIN:
                    rungs[i] = replace(r, dominated=True)
                else:
                    best_val = r.val_accuracy
        model = cls(name, spec, classes, rungs, nets, pre, stats, supernet, manifest)
        model._with_bn = {i: bn for i, (_, _, bn) in enumerate(built) if bn is not None}
        return model

    def export_bundle(self, out_dir: str | Path) -> Path:
        """Write our bundle (supernet + per-rung BN statistics + manifest)."""
        manifest = {k: v for k, v in self.manifest.items() if k not in ("weights", "bn_stats")}
        manifest.update({"family": "pssnet", "name": self.name, "spec": self.spec.to_dict(), "classes": self.classes,
                         "preprocess": self._pre,
                         "rungs": [{"name": r.name, "cfg": r.cfg, "flops": r.flops, "params": r.params,
                                    "accuracy": ({"val": r.val_accuracy, "test": r.accuracy}
                                                 if r.accuracy is not None else None), "pool": r.pool}
                                   for r in self.rungs if r.method == "pss-net"]})
        return save_bundle(out_dir, self._supernet, {r.name: self._stats[r.name] for r in self.rungs
                                                            if r.method == "pss-net"}, manifest)

    # ---- inference ----

    def preprocess(self, rgb_u8: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB of any size -> (3, S, S) normalised: shorter side to
        ``resize``, centre crop ``crop`` (ImageNet: 256 / 224; the demo: 32 / 32, the
        identity on its 32x32 images).  Grey and RGBA inputs are accepted."""
        img = resize_center_crop(to_rgb_u8(rgb_u8), int(self._pre["resize"]), self.input_size)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        return (x - self._mean) / self._std

    def preprocess_pixels(self, w: int, h: int) -> int:
        """Pixels of the largest intermediate ``preprocess`` makes for a w x h image (from
        the size alone: a server checks it from the header, before decoding)."""
        return resize_pixels(w, h, int(self._pre["resize"]), self.input_size)

    def int8(self, rung_index: int, calibration: Sequence[torch.Tensor] | dict[str, torch.Tensor]) -> torch.nn.Module:
        """Rung ``rung_index`` on real int8 kernels (CPU): its BN-folded convolutions and
        classifier quantized statically, activation ranges observed on ``calibration``
        ((n, 3, H, W) batches, resized to the rung's resolution here) or taken from the
        observers' state ``int8_observers`` kept of them (the same network, without the 0.3 s
        per batch the observers take); the stem convolution and the input resize stay in float
        (the stem in int8 cost the smallest rung 0.4 of its 0.6 points)."""
        from compress.int8 import quantize_static
        from models.pssnet.nets import ResizedBody, SubnetBody, _resize

        res = self._nets[rung_index].resolution
        inputs = calibration if isinstance(calibration, dict) else [_resize(b, res) for b in calibration]
        body = quantize_static(self._int8_source(rung_index), inputs, torch.zeros(1, 3, res, res),
                               keep_float=INT8_KEEP_FLOAT)
        return ResizedBody(body, res).eval()

    def int8_observers(self, rung_index: int, calibration: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The activation observers' state of rung ``rung_index``'s int8 network after
        ``calibration``: what ``int8`` rebuilds it from exactly (a bundle keeps it)."""
        from compress.int8 import observe_static
        from models.pssnet.nets import _resize

        res = self._nets[rung_index].resolution
        return observe_static(self._int8_source(rung_index), [_resize(b, res) for b in calibration],
                              torch.zeros(1, 3, res, res), keep_float=INT8_KEEP_FLOAT)

    def _int8_source(self, rung_index: int) -> torch.nn.Module:
        from models.pssnet.nets import SubnetBody

        # from a contiguous copy: the int8 rung is built exactly as it was measured
        return SubnetBody(self._contiguous(rung_index)).cpu()

    def _contiguous(self, rung_index: int) -> torch.nn.Module:
        """A copy of rung ``rung_index``'s network in the contiguous layout (the served one is
        channels-last): what exporters and torch.ao's quantizer take."""
        return copy.deepcopy(self._nets[rung_index]).to(memory_format=torch.contiguous_format).eval()

    def with_bn(self, rung_index: int) -> tuple[torch.nn.Module, list]:
        """Rung ``rung_index`` as a dense network with its BatchNorm layers (not folded) and
        its own statistics, plus (layer, running mean, running var) for each: what
        BN-statistics synthesis of calibration images needs."""
        from models.pssnet.nets import SlimBatchNorm2d

        r = self.rungs[rung_index]
        if rung_index in self._with_bn:
            dense = copy.deepcopy(self._with_bn[rung_index])
        else:
            dense = extract_subnet(self._supernet, SubnetConfig.from_dict(r.cfg))
            load_bn_stats(dense, self._stats[r.name])
        dense.eval()
        layers = [(m, m.bn.running_mean, m.bn.running_var) for m in dense.modules() if isinstance(m, SlimBatchNorm2d)]
        return dense, layers

    def forward(self, rung_index: int, batch: torch.Tensor) -> torch.Tensor:
        """Logits (n, classes) of rung ``rung_index`` on a preprocessed (n, 3, S, S) batch;
        the subnet resizes to its own resolution inside."""
        if not 0 <= rung_index < len(self._nets):
            raise IndexError(f"rung {rung_index} not in 0..{len(self._nets) - 1}")
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected (n, 3, S, S), got {tuple(batch.shape)}")
        with torch.inference_mode():
            batch = batch.to(self.device, non_blocking=True)
            runner = self._runners.get(rung_index)
            return runner(batch) if runner is not None else self._torch_forward(rung_index, batch)

    def _torch_forward(self, rung_index: int, batch: torch.Tensor) -> torch.Tensor:
        return self._nets[rung_index](batch.contiguous(memory_format=torch.channels_last))

    def int8_graph_inputs(self, rung_index: int, inputs: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor]:
        """Rung ``rung_index``'s fp32 network (a contiguous copy, input resize included: in an
        ONNX graph it costs a fraction of torch's interpolate, 0.7 ms on 32 glyphs) and its
        calibration ``inputs`` at the served input size: what another engine's int8 graph is
        made from.  Inputs synthesised at the rung's own resolution are brought to the input
        size first (the network resizes them back)."""
        from models.pssnet.nets import _resize

        return self._contiguous(rung_index), _resize(inputs.float(), self.input_size)

    def int8_forward(self, rung_index: int, batch: torch.Tensor) -> torch.Tensor:
        """Logits of rung ``rung_index``'s int8 version (CPU) on a preprocessed batch."""
        with torch.inference_mode():
            runner = self._int8_runners.get(rung_index) or self.int8_rungs[rung_index][0]
            return runner(batch.cpu())

    def int8_quality(self, rung_index: int) -> dict:
        """The held-out quality of rung ``rung_index``'s int8 version as served: that of the
        engine serving it, or, where two serve it (by batch size), the lower of theirs."""
        from models.common.engines import TORCH_AO

        entry = self.int8_rungs[rung_index][1]
        choice = self.int8_engine_choices.get(rung_index)
        served = set(choice.engines) if choice is not None else {TORCH_AO}
        measured = {TORCH_AO: entry.get("quality", {}), **entry.get("engine_quality", {})}
        quality = dict(entry.get("quality", {}))
        for k in quality:
            if not k.endswith("_fp32"):
                values = [measured[e][k] for e in served if isinstance(measured.get(e, {}).get(k), (int, float))]
                quality[k] = min(values) if values else quality[k]
        return quality

    def choose_engines(self, engine: str = "auto", sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
                       rungs: Sequence[int] | None = None, rounds: int = 5) -> dict[int, EngineChoice]:
        """Serve each of ``rungs`` (default: the ladder's, the only fp32 rungs a planner
        picks) on the fastest of torch, ONNX Runtime and OpenVINO (those installed) at each
        batch size, and each int8 rung on the faster of torch.ao and OpenVINO's int8 kernels,
        measured now on the calling thread with its thread count: call it on the thread that
        will serve.  ``engine``: "auto" (every installed engine), "torch", "onnxruntime" or
        "openvino" (that engine at every size).  fp32 logits agree to float rounding (the ONNX
        graph is the same network: a test checks it on held-out images).  An int8 rung goes
        to OpenVINO only where its bundle holds OpenVINO's held-out quality for it
        (``python -m models.pssnet.quantize BUNDLE --engine-quality``), so that the quality
        listed is always measured.  CPU only."""
        from models.common.engines import OPENVINO, TORCH, serve_faster, serve_int8_faster
        from models.pssnet.quantize import OPENVINO_CALIBRATION_INPUTS

        self._runners, self.engine_choices = {}, {}
        self._int8_runners, self.int8_engine_choices = {}, {}
        if engine == TORCH or self.device.type != "cpu":
            return {}
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(max(sizes), 3, self.input_size, self.input_size, generator=gen)
        for i in (rungs if rungs is not None else [r.index for r in self.ladder]):
            runner, choice = serve_faster(self._contiguous(i), lambda x, i=i: self._torch_forward(i, x), example, sizes,
                                          engine, rounds)
            if choice is not None:
                self._runners[i], self.engine_choices[i] = runner, choice
        on_ladder = {r.index for r in self.ladder}
        for i, (module, entry) in self.int8_rungs.items():
            # the int8 versions of the ladder's rungs only: making and checking an OpenVINO int8
            # graph costs about 1.5 s of start-up per rung, and a subnet whose fp32 rung is
            # dominated (another network as fast and more accurate) keeps torch.ao's int8
            if i not in on_ladder or OPENVINO not in entry.get("engine_quality", {}) or i not in self.int8_calibration:
                continue
            net, inputs = self.int8_graph_inputs(i, self.int8_calibration[i][:OPENVINO_CALIBRATION_INPUTS])
            stem_in_float = entry["engine_quality"][OPENVINO].get("stem_in_float", True)
            runner, choice = serve_int8_faster(net, module, inputs, example, sizes, engine, rounds,
                                               stem_in_float=stem_in_float)
            if choice is not None:
                self._int8_runners[i], self.int8_engine_choices[i] = runner, choice
        return self.engine_choices

    __call__ = forward

    @property
    def ladder(self) -> list[PssRung]:
        """The rungs a planner climbs: those not dominated on val (all of them when nothing
        was measured), by FLOPs."""
        return [r for r in self.rungs if not r.dominated] or list(self.rungs)

    def rung_by_name(self, name: str) -> PssRung:
        for r in self.rungs:
            if r.name == name:
                return r
        raise KeyError(name)

    def describe(self) -> dict:
        return {"name": self.name, "family": "pssnet", "model_name": self.spec.model_name,
                "classes": len(self.classes), "input_size": self.input_size,
                "rungs": [r.__dict__ for r in self.rungs]}


def main(argv: list[str] | None = None) -> None:
    """``python -m models.pssnet.serving CHECKPOINT`` prints the ladder."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("checkpoint", type=Path)
    args = ap.parse_args(argv)
    print(json.dumps(PssNetModel.from_checkpoint(args.checkpoint).describe(), indent=2))


if __name__ == "__main__":
    main()
