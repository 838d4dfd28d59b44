"""CF-ViT's two stages on the faster engine: torch, ONNX Runtime or OpenVINO, per stage and
batch size; its int8 version on OpenVINO's int8 kernels, and its bf16 version on OpenVINO's
bf16 kernels where the CPU has them.

Why: on a CPU a small ViT's time goes largely to what sits between its matrix products
(layer norms, GELU, softmax, reshapes), one torch operator at a time; OpenVINO fuses them.
On the bundled model at batch 32 (2-core Intel Xeon with AMX, one thread; docs/BENCHMARKS.md
3.1) its float graphs take about 0.7-0.8 of torch's time, its int8 graphs about 0.5, where
torch.ao's int8 linears stop near 0.75, and its bf16 graphs about 0.45 (torch's bf16
autocast: 0.7).

The early exit stays in torch: each stage is one graph (``coarse_outputs``: image -> logits,
features, embeddings, score; ``fine_logits``: image, features, embeddings and the selection
-> logits) and the exit test, the sort that picks the informative patches (ONNX has no
stable sort) and the gather of the rows that go on run between them
(``CfVisionTransformer.forward_exit`` with these runners).

Each reduced precision on OpenVINO rounds differently from torch's version of it, so its
held-out quality is measured on its own (``openvino_quality``, by the commands that measure
the version: ``models.cfvit.quantize``, ``models.cfvit.bf16``) and the server serves it only
where the bundle holds that measurement.  The int8 graphs quantize only the layers with weights (``int8_qdq(weight_layers_only=True)``):
with attention's activation products in int8 as well, OpenVINO's graph was slower than its
float one.  Their activations are symmetric int8 (``symmetric_activations``): with uint8 and a
zero point OpenVINO left a float subtraction per layer, and the fine stage took 26 ms at
batch 32 instead of 18.5 (its float graph: 40).  Their activation ranges come from calibration images the bundle stores
(``int8_calibration.safetensors``, written by ``python -m models.cfvit.quantize``), so the server makes
the same graphs whose held-out quality that command measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.cfvit.model import CfVisionTransformer, ExitOutput
from models.common import engines
from models.common.engines import EngineChoice

COARSE = "coarse", ("x",), ("logits", "features", "embeddings", "score")  # stage, graph inputs, outputs
FINE = "fine", ("x", "features", "embeddings", "kids", "rest"), ("logits",)
STAGES = (COARSE, FINE)
OPENVINO_IMAGES = 128  # training images OpenVINO's int8 graphs are quantized from (the server does it: about 2 s)
# How the int8 graphs are made, as the quantize command measured them (int8_qdq's options)
INT8_GRAPH = {"stem_in_float": False, "weight_layers_only": True, "symmetric_activations": True}


class Stage(nn.Module):
    """One stage of ``net`` as a module whose arguments and results are tensors: what is
    exported, and what torch runs in its place."""

    def __init__(self, net: CfVisionTransformer, stage: str) -> None:
        super().__init__()
        self.net, self.stage = net, stage

    def forward(self, *xs: torch.Tensor):
        return self.net.coarse_outputs(*xs) if self.stage == "coarse" else self.net.fine_logits(*xs)


def stage_inputs(net: CfVisionTransformer, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
    """What each stage takes for ``images`` (normalised): the images, and for the fine stage
    also ``net``'s coarse features, embeddings and selection on them."""
    with torch.inference_mode():
        _, features, embeddings, score = net.coarse_outputs(images)
        kids, rest = net.selection(score)
    return {"coarse": (images,), "fine": (images, features, embeddings, kids, rest)}


@dataclass
class StageRunners:
    """What runs each stage (per batch size, where two engines share it), and what was measured."""

    coarse: Callable[..., tuple[torch.Tensor, ...]]
    fine: Callable[..., torch.Tensor]
    choices: dict[str, EngineChoice | None]
    default: str  # the engine of a stage with no choice (torch, or torch.ao for int8)

    def forward_exit(self, net: CfVisionTransformer, x: torch.Tensor, eta: torch.Tensor) -> ExitOutput:
        return net.forward_exit(x, eta, coarse=self.coarse, fine=self.fine)

    def engines(self) -> set[str]:
        """Every engine serving some batch size of some stage."""
        return {e for c in self.choices.values() for e in (c.engines if c is not None else (self.default,))}

    def describe(self) -> dict:
        return {stage: c.describe() if c is not None else self.default for stage, c in self.choices.items()}


def float_graphs(net: CfVisionTransformer, example: torch.Tensor) -> dict[str, bytes] | None:
    """Each stage's float ONNX graph, exported once for every precision's engines (about
    0.3 s a graph); None where the exporter is not installed or fails (torch then serves)."""
    if not engines.available(engines.ONNXRUNTIME):
        return None
    inputs = stage_inputs(net, example[:1])
    try:
        return {stage: engines.export_onnx(Stage(net, stage).eval(), inputs[stage], names, outputs)
                for stage, names, outputs in STAGES}
    except Exception as exc:  # an engine may still be named: serve_faster exports again and says why
        engines.log.warning("CF-ViT's stages cannot be exported to ONNX (%s: %s)", type(exc).__name__, exc)
        return None


def serve_stages(net: CfVisionTransformer, example: torch.Tensor, sizes: Sequence[int], engine: str = "auto",
                 rounds: int = 5, graphs: dict[str, bytes] | None = None) -> StageRunners:
    """``net``'s float stages on the fastest engine per stage and batch size (``serve_faster``:
    every output must agree with torch's to float rounding).  ``example``: at least max(sizes)
    normalised images; ``graphs``: ``float_graphs``, where made."""
    inputs = stage_inputs(net, example)
    runners, choices = {}, {}
    for stage, names, outputs in STAGES:
        module = Stage(net, stage).eval()
        runners[stage], choices[stage] = engines.serve_faster(module, module, inputs[stage], sizes, engine, rounds,
                                                              names, outputs, (graphs or {}).get(stage))
    return StageRunners(runners["coarse"], runners["fine"], choices, engines.TORCH)


def serve_reduced_stages(net: CfVisionTransformer, reduced: CfVisionTransformer, precision: str,
                         images: torch.Tensor, example: torch.Tensor, sizes: Sequence[int], engine: str = "auto",
                         rounds: int = 5, graphs: dict[str, bytes] | None = None,
                         int8_graph: dict | None = None) -> StageRunners:
    """A reduced precision's stages on the faster of torch's version (``reduced``: torch.ao's
    int8 network, or the bf16 network, run under its autocast) and OpenVINO's graphs of
    ``net`` (``openvino_stages``), per stage and batch size (``serve_int8_faster`` /
    ``serve_bf16_faster``).  ``images`` (normalised): int8's calibration images (the
    bundle's), or for bf16 any images to check top-1 agreement on.  ``graphs``: ``float_graphs``.
    ``int8_graph``: how the measured int8 graphs were made (``int8_qdq``'s options, as the
    bundle's ``int8.json`` records them; default ``INT8_GRAPH``), so that a bundle measured
    with other options is rebuilt as it was measured."""
    from models.cfvit.bf16 import run_bf16

    checked, inputs = stage_inputs(net, images.float()), stage_inputs(net, example)
    runners, choices = {}, {}
    for stage, names, outputs in STAGES:
        module, ours, graph = Stage(net, stage).eval(), Stage(reduced, stage).eval(), (graphs or {}).get(stage)
        if precision == "int8":
            runners[stage], choices[stage] = engines.serve_int8_faster(
                module, ours, checked[stage], inputs[stage], sizes, engine, rounds, inputs=names, outputs=outputs,
                graph=graph, **(int8_graph or INT8_GRAPH))
        else:
            def under_autocast(*xs: torch.Tensor, ours=ours):
                with run_bf16():
                    return ours(*xs)

            runners[stage], choices[stage] = engines.serve_bf16_faster(
                module, under_autocast, checked[stage], inputs[stage], sizes, engine, rounds, inputs=names,
                outputs=outputs, graph=graph)
    return StageRunners(runners["coarse"], runners["fine"], choices, engines.TORCH_NAMES[precision])


def openvino_stages(net: CfVisionTransformer, precision: str, images: torch.Tensor, threads: int) -> StageRunners:
    """OpenVINO's graphs of ``net``'s stages in ``precision`` ("int8": quantized from
    ``images``, the calibration images; "bf16": the float graphs computed in bf16), made as
    the server makes them, on every batch size: for measuring their held-out quality."""
    calibrated = stage_inputs(net, images.float())
    runners = {}
    for stage, names, outputs in STAGES:
        graph = engines.export_onnx(Stage(net, stage).eval(), engines.first(calibrated[stage], 1), names, outputs)
        if precision == "int8":
            graph = engines.int8_qdq(graph, calibrated[stage], **INT8_GRAPH)
        runners[stage] = engines.build(engines.OPENVINO, graph, threads, precision="bf16" if precision == "bf16"
                                       else "f32")
    return StageRunners(runners["coarse"], runners["fine"], {"coarse": None, "fine": None}, engines.OPENVINO)


def openvino_quality(net: CfVisionTransformer, precision: str, images: torch.Tensor, dataset: str,
                     command: str, note: str) -> dict:
    """``{"openvino": ...}`` for a version's manifest (``engine_quality``): the held-out top-1
    of each stage of OpenVINO's ``precision`` graphs (``openvino_stages``) on val and test, and
    their val eta curves, which the planner uses where they serve."""
    import contextlib
    import sys
    from importlib.metadata import version

    from models.cfvit.evaluate import STAGES as KEYS, evaluate_versions

    on_engine = OnEngine(net, openvino_stages(net, precision, images, torch.get_num_threads()))
    ev = evaluate_versions(dataset, {"openvino": (on_engine, contextlib.nullcontext)}, f"{precision} openvino")
    val, test = ev["val"]["openvino"], ev["test"]["openvino"]
    quality = {stage: {"test_accuracy": test[key], "val_accuracy": val[key]} for stage, key in KEYS}
    for stage, q in quality.items():
        print(f"[{precision}] {stage}: OpenVINO {precision} test {q['test_accuracy']:.4f}", file=sys.stderr)
    graphs = "QDQ graphs of both stages from onnxruntime's static quantizer (MinMax, per-channel weights), " \
        f"onnxruntime {version('onnxruntime')}" if precision == "int8" else "both stages' float graphs in bf16"
    return {"openvino": {**quality, "eta_curve": val["eta_curve"], "eta_curve_dense": val["eta_curve_dense"],
                         "backend": f"OpenVINO {version('openvino')} CPU {precision}: {graphs}",
                         **({"graph": INT8_GRAPH} if precision == "int8" else {}),
                         "note": note, "command": command}}


class OnEngine(nn.Module):
    """``net`` with its stages run by ``runners``: ``forward_all`` as the network's own, so that
    ``models.cfvit.evaluate`` measures what an engine serves."""

    def __init__(self, net: CfVisionTransformer, runners: StageRunners) -> None:
        super().__init__()
        self.net, self.runners, self.cfg = net, runners, net.cfg

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features, embeddings, score = self.runners.coarse(x)
        kids, rest = self.net.selection(score)
        return logits, self.runners.fine(x, features, embeddings, kids, rest)
