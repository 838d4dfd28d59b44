"""Inference engines beside torch for small networks (ONNX Runtime, OpenVINO), chosen per
batch size by measurement on the serving thread.

Why: torch's eager mode pays a fixed cost per operator (oneDNN primitive look-up, dispatch,
the GIL between layers), about a millisecond per forward pass of a small MobileNet on one
thread, which is most of the pass at batch 1: the bundled PSS-Net's `min` rung takes about
1.4 ms in torch and 0.12 ms in ONNX Runtime at batch 1 on an AVX-512 CPU.  In full batches
the engines trade places by network (ONNX Runtime 1.6-2x faster on some rungs, 2x slower on
a pruned rung with odd channel counts, where OpenVINO is the fastest; docs/BENCHMARKS.md), so
none is always the faster: each network gets every installed engine, timed at each batch
size, and every batch runs on the engine that was faster at the nearest measured size below
it.  For int8, OpenVINO runs a statically quantized ONNX graph (QDQ, made here by ONNX
Runtime's quantizer from the rung's stored calibration inputs) on its int8 kernels: 2-3x
faster than torch.ao's int8 at batch 32 and 7x at batch 1 on the dev host.

A network may take several inputs and give several outputs (CF-ViT's fine stage takes the
image, the coarse stage's features and the selected tokens' indices): an ``example`` or
``calibration`` is then a tuple of tensors that share the batch axis, and a runner takes and
returns them in the order the graph names them.

Both engines are optional dependencies (``pip install anytime-serve[onnx]``: onnxruntime, plus
onnx for torch's exporter; ``anytime-serve[openvino]``: openvino and those two, whose
quantizer makes its int8 graphs); without them everything runs on torch.  Export happens in
memory at start-up, so nothing is written to disk and a checkpoint never needs a converted
copy.
"""

from __future__ import annotations

import io
import logging
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TORCH, ONNXRUNTIME, OPENVINO = "torch", "onnxruntime", "openvino"
ENGINES = ("auto", TORCH, ONNXRUNTIME, OPENVINO)  # what a family's ``engine`` setting accepts
EXTRAS = {ONNXRUNTIME: "onnx", OPENVINO: "openvino"}  # the pip extra that installs each engine
# The largest difference from torch's output that another engine's may show, relative to the
# output's own scale: float rounding in another kernel order is about 1e-6 of it (2e-5 on
# logits of about 20, docs/BENCHMARKS.md); anything near 1e-3 is a different computation.
AGREEMENT_TOLERANCE = 1e-3
AGREEMENT_ITEMS = 32  # items that check it (a batch of 128 more would cost CF-ViT's start-up about 1 s)

log = logging.getLogger("anytime.engines")


def import_openvino():
    """``openvino``, imported with its usage telemetry declined.

    Why: ``import openvino`` initialises the telemetry of its model converter (which nothing
    here calls), and that writes a client ID and usage counts into ``~/intel`` of whoever runs
    the server, or, in the image's read-only home, logs a warning.  The telemetry declines
    where its CI variable is set, so the import runs with ``CI=true`` and the variable is put
    back after it."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    saved = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        import openvino
    finally:
        if saved is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = saved
    return openvino


def available(engine: str = ONNXRUNTIME) -> bool:
    """Whether ``engine`` and what it needs are installed: ONNX Runtime and the ``onnx``
    package torch's exporter needs; for OpenVINO, those too (its int8 graphs come from ONNX
    Runtime's quantizer)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        if engine == OPENVINO:
            import_openvino()
    except ImportError:
        return False
    return True


def require(engine: str = ONNXRUNTIME) -> None:
    if not available(engine):
        raise RuntimeError(f"engine={engine} needs it installed: pip install 'anytime-serve[{EXTRAS[engine]}]', "
                           "or use engine=auto / torch")


def installed() -> tuple[str, ...]:
    """The engines beside torch that ``auto`` tries here."""
    return tuple(e for e in (ONNXRUNTIME, OPENVINO) if available(e))


Inputs = torch.Tensor | tuple[torch.Tensor, ...]  # one input, or several sharing the batch axis


def as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def first(inputs: Inputs, n: int) -> tuple[torch.Tensor, ...]:
    """The first ``n`` items of every input."""
    return tuple(t[:n] for t in as_tuple(inputs))


def logits_of(output: Inputs) -> torch.Tensor:
    """A classifier's logits among its outputs: the first."""
    return as_tuple(output)[0]


def export_onnx(module: torch.nn.Module, example: Inputs, inputs: Sequence[str] = ("x",),
                outputs: Sequence[str] = ("y",)) -> bytes:
    """``module`` as an ONNX graph (opset 17) with ``inputs`` and ``outputs`` named (one "x"
    and one "y" by default), the batch axis of each dynamic."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module.eval(), tuple(t.contiguous() for t in as_tuple(example)), buf,
                          input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes={name: {0: "n"} for name in (*inputs, *outputs)}, opset_version=17,
                          dynamo=False)
    return buf.getvalue()


def _array(t: torch.Tensor) -> np.ndarray:
    """A tensor as the engines take it: float as float32, integers (indices) as they are."""
    t = t.detach().cpu()
    if t.is_floating_point():
        return np.ascontiguousarray(t.float().numpy())  # bf16 (a torch bf16 stage's output) has no numpy type
    return np.ascontiguousarray(t.numpy())


def _outputs(arrays: Sequence[np.ndarray]) -> Inputs:
    out = tuple(torch.from_numpy(np.array(a, copy=True)) for a in arrays)
    return out[0] if len(out) == 1 else out


def _no_preprocess_advice(record: logging.LogRecord) -> bool:
    """ONNX Runtime's quantizer advises, on the root logger, to run its shape pre-processing
    first; these graphs come straight from torch's exporter with their shapes, so it is noise."""
    return "pre-process" not in str(record.msg)


def activation_products(model) -> list[str]:
    """The MatMul nodes of an ONNX ``model`` that multiply two activations (a transformer's
    attention: queries by keys, weights by values), as opposed to an input by a weight."""
    constants = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and not any(i in constants for i in n.input)]


WEIGHT_LAYERS = ("Conv", "Gemm", "MatMul")  # what ``weight_layers_only`` quantizes


def int8_qdq(graph: bytes, calibration: Inputs, batch: int = 32, stem_in_float: bool = True,
             weight_layers_only: bool = False, symmetric_activations: bool = False) -> bytes:
    """The float ONNX ``graph`` statically quantized to int8 by ONNX Runtime's quantizer, in
    QDQ form: per-channel symmetric int8 weights, uint8 activations whose ranges are the
    extremes observed on ``calibration`` (the same MinMax rule as the torch.ao rungs; one
    tensor per graph input, in their order).
    ``stem_in_float``: the first convolution stays float, as in the torch.ao rungs (its three
    input channels carry the most information per weight; in int8 it cost PSS-Net's f10 rung
    0.3 of its 0.6 points).  ``weight_layers_only``: only the layers with weights (Conv, Gemm,
    MatMul by a weight) in int8; the rest, attention's products of two activations included,
    stays float.  On CF-ViT that is what makes int8 faster: with every operator quantized,
    OpenVINO's graph was slower than its float one (the Q/DQ pairs around softmax, GELU and
    the attention products break its fusions).  ``symmetric_activations``: activations in
    int8 with zero point 0 (their range symmetric about 0) instead of uint8 with a zero point:
    OpenVINO then folds each dequantization into its int8 matrix product, where a zero point
    left a float subtraction and a slow conversion per layer (on CF-ViT's fine stage 6.5 of
    26 ms at batch 32; 18.5 ms without them).  Deterministic for the same inputs.  About
    0.5-2 s for a PSS-Net rung and 512 inputs."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = onnx.load_from_string(graph)
    names = [i.name for i in model.graph.input]

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            data = [_array(t) for t in as_tuple(calibration)]
            self._it = iter([{k: d[i:i + batch] for k, d in zip(names, data)}
                             for i in range(0, len(data[0]), batch)])

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(graph)
        convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
        excluded = convs[:1] if stem_in_float else []
        if weight_layers_only:
            excluded += activation_products(model)
        root = logging.getLogger()
        root.addFilter(_no_preprocess_advice)
        try:
            quantize_static(str(src), str(dst), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                            op_types_to_quantize=list(WEIGHT_LAYERS) if weight_layers_only else None,
                            extra_options={"ActivationSymmetric": symmetric_activations})
        finally:
            root.removeFilter(_no_preprocess_advice)
        return dst.read_bytes()


class OrtNetwork:
    """A torch module exported to ONNX (in memory; or a ready ONNX graph) run by an ONNX
    Runtime CPU session: (n, ...) tensors in (one per graph input), float32 tensors out (one,
    or a tuple of the graph's outputs), the batch axis dynamic.  Safe to call from several
    threads (ONNX Runtime sessions are)."""

    def __init__(self, module: torch.nn.Module | None, example: torch.Tensor | None, threads: int,
                 graph: bytes | None = None) -> None:
        import onnxruntime as ort

        graph = graph if graph is not None else export_onnx(module, example)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Its worker threads would otherwise spin between passes, taking a core from the
        # event loop (the server leaves one core for HTTP, decoding and encoding).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.onnx_bytes = len(graph)

    def __call__(self, *xs: torch.Tensor) -> Inputs:
        return _outputs(self.session.run(None, {k: _array(x) for k, x in zip(self.inputs, xs)}))


class OpenVinoNetwork:
    """An ONNX graph (float, or int8 in QDQ form) compiled by OpenVINO for the CPU.

    float32 stays float32 (``precision`` "f32"): OpenVINO's CPU plugin otherwise runs float
    graphs in bf16 on CPUs that have it (AVX512-BF16, AMX), which costs super-resolution 0.18 dB
    and moves logits far past ``AGREEMENT_TOLERANCE``; ``precision`` "bf16" asks for exactly
    that, for a bf16 rung whose own quality is measured.  A QDQ graph runs on its int8 kernels
    (VNNI / AMX).
    One inference request per calling thread (a request is not safe to share); threads not
    pinned to cores, since the server's event loop shares them."""

    def __init__(self, graph: bytes, threads: int, precision: str = "f32") -> None:
        ov = import_openvino()
        core = ov.Core()
        with tempfile.TemporaryDirectory() as tmp:  # read_model takes a path (or a model in memory with weights)
            path = Path(tmp) / "net.onnx"
            path.write_bytes(graph)
            model = core.read_model(str(path))
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": max(1, threads), "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False})
        self.onnx_bytes = len(graph)
        self._local = threading.local()

    def __call__(self, *xs: torch.Tensor) -> Inputs:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer({i: _array(x) for i, x in enumerate(xs)})
        return _outputs([result[o] for o in self.compiled.outputs])


def build(engine: str, graph: bytes, threads: int, precision: str = "f32") -> Callable[..., Inputs]:
    """A runner of ``graph`` on ``engine`` (onnxruntime or openvino; ``precision`` "bf16":
    OpenVINO computes the float graph in bf16)."""
    if engine == ONNXRUNTIME:
        if precision != "f32":
            raise ValueError("ONNX Runtime's CPU runs float graphs in float32 only")
        return OrtNetwork(None, None, threads, graph=graph)
    if engine == OPENVINO:
        return OpenVinoNetwork(graph, threads, precision)
    raise ValueError(f"no ONNX engine {engine!r}")


@dataclass(frozen=True)
class EngineChoice:
    """Which engine runs a batch of ``n``: that of the largest measured size <= n.
    ``ms``: the median ms per pass each engine took at each measured size."""

    sizes: tuple[int, ...]  # ascending; the first is 1
    engines: tuple[str, ...]  # the faster engine at each size
    ms: dict[str, tuple[float, ...]]

    def engine(self, n: int) -> str:
        i = max(0, int(np.searchsorted(self.sizes, n, side="right")) - 1)
        return self.engines[i]

    def describe(self) -> dict:
        return {"by_batch_size": {str(n): e for n, e in zip(self.sizes, self.engines)},
                "measured_ms": {e: {str(n): round(v, 4) for n, v in zip(self.sizes, ms)} for e, ms in self.ms.items()}}


# An engine that took more than this many times the fastest one's time at every size in the
# first round is not timed in the later ones (no rounding of a shared machine's noise turns a
# 2x gap around; each engine costs start-up time per round, mostly at batch 1's repetitions).
CLEARLY_SLOWER = 2.0


def measure(runners: dict[str, Callable[..., object]], example: Inputs, sizes: Sequence[int],
            rounds: int = 5) -> EngineChoice:
    """Time every runner at every size on the first n items of ``example``, interleaved in a shuffled order
    (so that a slow moment of a shared machine falls on both), and choose the faster by the
    median.  A runner ``CLEARLY_SLOWER`` than the fastest at every size after the first round
    is left out of the rest.  Runs where it will serve: the caller's thread and its thread
    count."""
    sizes = tuple(sorted({1, *sizes}))
    samples: dict[str, dict[int, list[float]]] = {k: {n: [] for n in sizes} for k in runners}
    timed = list(runners)
    with torch.inference_mode():
        for k in timed:  # warm-up: first passes allocate and pick kernels
            for n in sizes:
                runners[k](*first(example, n))
        for r in range(rounds):
            order = [(k, n) for k in timed for n in sizes]
            random.shuffle(order)
            for k, n in order:
                reps = max(1, 16 // n)
                args = first(example, n)
                t0 = time.perf_counter()
                for _ in range(reps):
                    runners[k](*args)
                samples[k][n].append((time.perf_counter() - t0) / reps)
            if r == 0 and len(timed) > 1:
                best = {n: min(samples[k][n][0] for k in timed) for n in sizes}
                timed = [k for k in timed if not all(samples[k][n][0] > CLEARLY_SLOWER * best[n] for n in sizes)]
    ms = {k: tuple(1000 * statistics.median(per[n]) for n in sizes) for k, per in samples.items()}
    engines = tuple(min(ms, key=lambda k: ms[k][i]) for i in range(len(sizes)))
    return EngineChoice(sizes, engines, ms)


class FasterEngine:
    """A network served on whichever engine ``choice`` says is faster for the batch's size.
    Keeps only the runners ``choice`` uses: another engine's compiled graph holds about
    50-150 MiB once it has run a full batch (OpenVINO's buffers for the largest shape seen)."""

    def __init__(self, runners: dict[str, Callable[..., Inputs]], choice: EngineChoice) -> None:
        self.runners = {k: v for k, v in runners.items() if k in set(choice.engines)}
        self.choice = choice

    def __call__(self, *xs: torch.Tensor) -> Inputs:
        return self.runners[self.choice.engine(int(xs[0].shape[0]))](*xs)


def _candidates(engine: str) -> tuple[str, ...]:
    """The engines beside torch that ``engine`` asks for (named ones must be installed)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == TORCH:
        return ()
    if engine != "auto":
        require(engine)
        return (engine,)
    return installed()


def gap_to(got: Inputs, want: Inputs) -> float:
    """The largest difference between two runs' outputs, relative to each output's scale."""
    return max(float((g - w).abs().max()) / (1.0 + float(w.abs().max()))
               for g, w in zip(as_tuple(got), as_tuple(want), strict=True))


def serve_faster(module: torch.nn.Module, torch_runner: Callable[..., Inputs],
                 example: Inputs, sizes: Sequence[int], engine: str = "auto",
                 rounds: int = 5, inputs: Sequence[str] = ("x",), outputs: Sequence[str] = ("y",),
                 graph: bytes | None = None) -> tuple[Callable[..., Inputs], EngineChoice | None]:
    """``module``'s runner for ``engine``: "torch" returns ``torch_runner`` as it is;
    "onnxruntime" or "openvino" that engine at every size; "auto" torch and every engine
    installed here, measured at ``sizes`` on ``example`` and chosen per size.  ``example``
    holds at least max(sizes) items of what the network is served; the exported graph is
    traced on it, and each engine's output on its first ``AGREEMENT_ITEMS`` must agree with
    torch's (``AGREEMENT_TOLERANCE``).  Where export, an engine or that agreement fails, "auto" leaves
    that engine out (with a warning; torch always remains) and a named engine raises.
    ``inputs``, ``outputs``: the graph's names, for a module of several (``example`` a tuple).
    ``graph``: ``module``'s ONNX graph where the caller has it (``export_onnx``), not exported again."""
    candidates = _candidates(engine)
    if not candidates:
        return torch_runner, None
    built: dict[str, Callable[..., Inputs]] = {}
    with torch.inference_mode():
        want = torch_runner(*first(example, AGREEMENT_ITEMS))
    for name in candidates:
        try:
            graph = graph if graph is not None else export_onnx(module, first(example, 1), inputs, outputs)
            net = build(name, graph, torch.get_num_threads())
            with torch.inference_mode():
                gap = gap_to(net(*first(example, AGREEMENT_ITEMS)), want)
            if not gap <= AGREEMENT_TOLERANCE:  # NaN included
                raise RuntimeError(f"its output differs from torch's by {gap:.2g} of the output's scale "
                                   f"(more than {AGREEMENT_TOLERANCE:g})")
            built[name] = net
        except Exception as exc:
            if engine != "auto":  # asked for by name: say why it cannot be had
                raise RuntimeError(f"engine={engine} cannot serve {type(module).__name__}: {exc}") from exc
            # auto is the default: a network an engine cannot run as torch does is served by
            # the others, never refused
            log.warning("engine=auto: %s left out for %s (%s: %s)", name, type(module).__name__,
                        type(exc).__name__, exc)
    if not built:
        return torch_runner, None
    runners = built if engine != "auto" else {TORCH: torch_runner, **built}
    choice = measure(runners, example, sizes, rounds)
    return FasterEngine(runners, choice), choice


# An int8 graph on another engine rounds differently from torch.ao's: its top-1 agreement with
# the float network on the calibration inputs may fall short of torch.ao's by this much before
# it is refused (a broken int8 path, like fbgemm's overflow on AVX-512, loses tens of points;
# OpenVINO's agreed 3.2 points below torch.ao's on clr-l1-f10 with the same held-out top-1).
INT8_AGREEMENT_SLACK = 0.05
INT8_CHECK_INPUTS = 128  # calibration inputs that check: a point is 1.3 of them (start-up time: 3 networks each)
INT8_ENGINES = (OPENVINO,)  # ONNX Runtime's int8 is no faster than its own float (docs/BENCHMARKS.md)
TORCH_AO = "torch.ao"  # torch's own int8 kernels (oneDNN), the engine every int8 rung has


def serve_int8_faster(fp32_module: torch.nn.Module, torch_int8: Callable[..., Inputs],
                      calibration: Inputs, example: Inputs, sizes: Sequence[int], engine: str = "auto",
                      rounds: int = 5, stem_in_float: bool = True, weight_layers_only: bool = False,
                      symmetric_activations: bool = False, inputs: Sequence[str] = ("x",),
                      outputs: Sequence[str] = ("y",), graph: bytes | None = None,
                      ) -> tuple[Callable[..., Inputs], EngineChoice | None]:
    """An int8 rung's runner: torch.ao's int8 network (``torch_int8``) and, where ``engine``
    allows and OpenVINO is installed, ``fp32_module`` quantized from the same ``calibration``
    inputs by ONNX Runtime's quantizer and run on OpenVINO's int8 kernels, measured and chosen
    per size as ``serve_faster`` does (``serve_reduced_faster``, checked on ``calibration``).
    ``stem_in_float``, ``weight_layers_only``, ``symmetric_activations``: as ``int8_qdq`` (the
    choices the rung's quality was measured with)."""
    calibration = tuple(t.float() if t.is_floating_point() else t for t in as_tuple(calibration))  # stored as fp16
    return serve_reduced_faster(
        fp32_module, torch_int8, calibration, example, sizes, engine, rounds, "int8",
        lambda float_graph: int8_qdq(float_graph, calibration, stem_in_float=stem_in_float,
                                     weight_layers_only=weight_layers_only,
                                     symmetric_activations=symmetric_activations),
        inputs=inputs, outputs=outputs, graph=graph)


def serve_bf16_faster(fp32_module: torch.nn.Module, torch_bf16: Callable[..., Inputs], check: Inputs,
                      example: Inputs, sizes: Sequence[int], engine: str = "auto", rounds: int = 5,
                      inputs: Sequence[str] = ("x",), outputs: Sequence[str] = ("y",), graph: bytes | None = None,
                      ) -> tuple[Callable[..., Inputs], EngineChoice | None]:
    """A bf16 rung's runner: torch's (``torch_bf16``: autocast) and, where ``engine`` allows and
    OpenVINO is installed, ``fp32_module``'s float graph compiled by OpenVINO for bf16 (AMX /
    AVX512-BF16: on CF-ViT about twice its float graph's speed), measured and chosen per size
    as ``serve_faster`` does (``serve_reduced_faster``, checked on ``check``).  Only where the
    CPU multiplies bf16 natively (the caller's test): elsewhere OpenVINO would emulate it."""
    return serve_reduced_faster(fp32_module, torch_bf16, check, example, sizes, engine, rounds, "bf16",
                                lambda float_graph: float_graph, inputs=inputs, outputs=outputs, graph=graph)


TORCH_NAMES = {"int8": TORCH_AO, "bf16": TORCH}  # torch's own engine of each reduced precision


def serve_reduced_faster(fp32_module: torch.nn.Module, torch_reduced: Callable[..., Inputs], check: Inputs,
                         example: Inputs, sizes: Sequence[int], engine: str, rounds: int, precision: str,
                         make_graph: Callable[[bytes], bytes], inputs: Sequence[str] = ("x",),
                         outputs: Sequence[str] = ("y",), graph: bytes | None = None,
                         ) -> tuple[Callable[..., Inputs], EngineChoice | None]:
    """A reduced-precision rung's runner: torch's own (``torch_reduced``) and OpenVINO's
    (``make_graph`` of ``fp32_module``'s float graph, compiled for ``precision``: "int8" runs a
    QDQ graph on its int8 kernels, "bf16" a float graph in bf16), measured and chosen per size
    as ``serve_faster`` does.  The two versions round differently, so they are compared by
    top-1 agreement with the float network on ``check`` (its first ``INT8_CHECK_INPUTS``), not
    by logits (``INT8_AGREEMENT_SLACK``); the caller lists the held-out quality of each engine
    it serves.  A module of several outputs is compared by its first (the logits).  Where
    OpenVINO fails or disagrees, "auto" keeps torch's and engine=openvino raises.  ``graph``:
    ``fp32_module``'s float graph where the caller has it."""
    # onnxruntime names the float rungs' engine; it has no faster reduced precision, so those stay on torch
    candidates = [e for e in _candidates(engine) if e in INT8_ENGINES] if engine != ONNXRUNTIME else []
    if not candidates:
        return torch_reduced, None
    check = first(check, INT8_CHECK_INPUTS)
    with torch.inference_mode():
        reference = logits_of(fp32_module(*check)).argmax(1)
        torch_agree = float((logits_of(torch_reduced(*check)).argmax(1) == reference).float().mean())
    built = {}
    for name in candidates:
        try:
            reduced = make_graph(graph if graph is not None else export_onnx(fp32_module, first(example, 1), inputs,
                                                                             outputs))
            net = build(name, reduced, torch.get_num_threads(), precision="bf16" if precision == "bf16" else "f32")
            with torch.inference_mode():
                agree = float((logits_of(net(*check)).argmax(1) == reference).float().mean())
            if not agree >= torch_agree - INT8_AGREEMENT_SLACK:
                raise RuntimeError(f"its {precision} top-1 agrees with float on {agree:.1%} of the check inputs, "
                                   f"{TORCH_NAMES[precision]}'s on {torch_agree:.1%}")
            built[name] = net
        except Exception as exc:
            if engine == OPENVINO:
                raise RuntimeError(f"engine=openvino cannot serve this {precision} rung: {exc}") from exc
            log.warning("engine=%s: %s left out for a %s rung (%s: %s)", engine, name, precision,
                        type(exc).__name__, exc)
    if not built:
        return torch_reduced, None
    runners = built if engine == OPENVINO else {TORCH_NAMES[precision]: torch_reduced, **built}
    choice = measure(runners, example, sizes, rounds)
    return FasterEngine(runners, choice), choice
