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

Both engines are optional dependencies (``pip install anytime-serve[onnx]``: onnxruntime, plus
onnx for torch's exporter; ``anytime-serve[openvino]``: openvino and those two, whose
quantizer makes its int8 graphs); without them everything runs on torch.  Export happens in
memory at start-up, so nothing is written to disk and a checkpoint never needs a converted
copy.
"""

from __future__ import annotations

import io
import logging
import random
import statistics
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

log = logging.getLogger("anytime.engines")


def available(engine: str = ONNXRUNTIME) -> bool:
    """Whether ``engine`` and what it needs are installed: ONNX Runtime and the ``onnx``
    package torch's exporter needs; for OpenVINO, those too (its int8 graphs come from ONNX
    Runtime's quantizer)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        if engine == OPENVINO:
            import openvino  # noqa: F401
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


def export_onnx(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    """``module`` as an ONNX graph (opset 17) with input "x" and output "y", the batch axis dynamic."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module.eval(), (example.contiguous(),), buf, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    return buf.getvalue()


def _no_preprocess_advice(record: logging.LogRecord) -> bool:
    """ONNX Runtime's quantizer advises, on the root logger, to run its shape pre-processing
    first; these graphs come straight from torch's exporter with their shapes, so it is noise."""
    return "pre-process" not in str(record.msg)


def int8_qdq(graph: bytes, calibration: torch.Tensor, batch: int = 32, stem_in_float: bool = True) -> bytes:
    """The float ONNX ``graph`` statically quantized to int8 by ONNX Runtime's quantizer, in
    QDQ form: per-channel symmetric int8 weights, uint8 activations whose ranges are the
    extremes observed on ``calibration`` (the same MinMax rule as the torch.ao rungs).
    ``stem_in_float``: the first convolution stays float, as in the torch.ao rungs (its three
    input channels carry the most information per weight; in int8 it cost PSS-Net's f10 rung
    0.3 of its 0.6 points).  Deterministic for the same inputs.  About 0.5-2 s for a PSS-Net
    rung and 512 inputs."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            data = calibration.float().contiguous().numpy()
            self._it = iter([{"x": data[i:i + batch]} for i in range(0, len(data), batch)])

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(graph)
        convs = [n.name for n in onnx.load_from_string(graph).graph.node if n.op_type == "Conv"]
        excluded = convs[:1] if stem_in_float else []
        root = logging.getLogger()
        root.addFilter(_no_preprocess_advice)
        try:
            quantize_static(str(src), str(dst), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=excluded)
        finally:
            root.removeFilter(_no_preprocess_advice)
        return dst.read_bytes()


class OrtNetwork:
    """A torch module exported to ONNX (in memory; or a ready ONNX graph) run by an ONNX
    Runtime CPU session: float32 (n, ...) tensor in, float32 tensor out, the batch axis
    dynamic.  Safe to call from several threads (ONNX Runtime sessions are)."""

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
        self.onnx_bytes = len(graph)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {"x": array})[0])


class OpenVinoNetwork:
    """An ONNX graph (float, or int8 in QDQ form) compiled by OpenVINO for the CPU.

    float32 stays float32: OpenVINO's CPU plugin otherwise runs float graphs in bf16 on CPUs
    that have it (AVX512-BF16, AMX), which costs super-resolution 0.18 dB and moves logits
    far past ``AGREEMENT_TOLERANCE``.  A QDQ graph runs on its int8 kernels (VNNI / AMX).
    One inference request per calling thread (a request is not safe to share); threads not
    pinned to cores, since the server's event loop shares them."""

    def __init__(self, graph: bytes, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        with tempfile.TemporaryDirectory() as tmp:  # read_model takes a path (or a model in memory with weights)
            path = Path(tmp) / "net.onnx"
            path.write_bytes(graph)
            model = core.read_model(str(path))
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": max(1, threads), "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False})
        self.onnx_bytes = len(graph)
        self._local = threading.local()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(np.array(request.infer({0: array})[0], copy=True))


def build(engine: str, graph: bytes, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A runner of ``graph`` on ``engine`` (onnxruntime or openvino)."""
    if engine == ONNXRUNTIME:
        return OrtNetwork(None, None, threads, graph=graph)
    if engine == OPENVINO:
        return OpenVinoNetwork(graph, threads)
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


def measure(runners: dict[str, Callable[[torch.Tensor], object]], example: torch.Tensor, sizes: Sequence[int],
            rounds: int = 5) -> EngineChoice:
    """Time every runner at every size on ``example[:n]``, interleaved in a shuffled order
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
                runners[k](example[:n])
        for r in range(rounds):
            order = [(k, n) for k in timed for n in sizes]
            random.shuffle(order)
            for k, n in order:
                reps = max(1, 16 // n)
                t0 = time.perf_counter()
                for _ in range(reps):
                    runners[k](example[:n])
                samples[k][n].append((time.perf_counter() - t0) / reps)
            if r == 0 and len(timed) > 1:
                best = {n: min(samples[k][n][0] for k in timed) for n in sizes}
                timed = [k for k in timed if not all(samples[k][n][0] > CLEARLY_SLOWER * best[n] for n in sizes)]
    ms = {k: tuple(1000 * statistics.median(per[n]) for n in sizes) for k, per in samples.items()}
    engines = tuple(min(ms, key=lambda k: ms[k][i]) for i in range(len(sizes)))
    return EngineChoice(sizes, engines, ms)


class FasterEngine:
    """A network served on whichever engine ``choice`` says is faster for the batch's size."""

    def __init__(self, runners: dict[str, Callable[[torch.Tensor], torch.Tensor]], choice: EngineChoice) -> None:
        self.runners, self.choice = runners, choice

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.runners[self.choice.engine(int(x.shape[0]))](x)


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


def serve_faster(module: torch.nn.Module, torch_runner: Callable[[torch.Tensor], torch.Tensor],
                 example: torch.Tensor, sizes: Sequence[int], engine: str = "auto",
                 rounds: int = 5) -> tuple[Callable[[torch.Tensor], torch.Tensor], EngineChoice | None]:
    """``module``'s runner for ``engine``: "torch" returns ``torch_runner`` as it is;
    "onnxruntime" or "openvino" that engine at every size; "auto" torch and every engine
    installed here, measured at ``sizes`` on ``example`` and chosen per size.  ``example``
    holds at least max(sizes) items of what the network is served; the exported graph is
    traced on it, and each engine's output on all of ``example`` must agree with torch's
    (``AGREEMENT_TOLERANCE``).  Where export, an engine or that agreement fails, "auto" leaves
    that engine out (with a warning; torch always remains) and a named engine raises."""
    candidates = _candidates(engine)
    if not candidates:
        return torch_runner, None
    built: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    graph: bytes | None = None
    with torch.inference_mode():
        want = torch_runner(example)
    for name in candidates:
        try:
            graph = graph if graph is not None else export_onnx(module, example[:1])
            net = build(name, graph, torch.get_num_threads())
            with torch.inference_mode():
                gap = float((net(example) - want).abs().max()) / (1.0 + float(want.abs().max()))
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


def serve_int8_faster(fp32_module: torch.nn.Module, torch_int8: Callable[[torch.Tensor], torch.Tensor],
                      calibration: torch.Tensor, example: torch.Tensor, sizes: Sequence[int], engine: str = "auto",
                      rounds: int = 5, stem_in_float: bool = True,
                      ) -> tuple[Callable[[torch.Tensor], torch.Tensor], EngineChoice | None]:
    """An int8 rung's runner: torch.ao's int8 network (``torch_int8``) and, where ``engine``
    allows and OpenVINO is installed, ``fp32_module`` quantized from the same ``calibration``
    inputs by ONNX Runtime's quantizer and run on OpenVINO's int8 kernels, measured and chosen
    per size as ``serve_faster`` does.  The two int8 networks round differently, so they are
    compared by top-1 agreement with the float network on ``calibration``, not by logits
    (``INT8_AGREEMENT_SLACK``); the caller lists the held-out quality of each engine it serves.
    ``stem_in_float``: as ``int8_qdq`` (the choice the rung's quality was measured with)."""
    # onnxruntime names the float rungs' engine; its int8 is not offered, so those stay on torch.ao
    candidates = [e for e in _candidates(engine) if e in INT8_ENGINES] if engine != ONNXRUNTIME else []
    if not candidates:
        return torch_int8, None
    x = calibration.float()
    check = x[:INT8_CHECK_INPUTS]
    with torch.inference_mode():
        reference = fp32_module(check).argmax(1)
        torch_agree = float((torch_int8(check).argmax(1) == reference).float().mean())
    built = {}
    for name in candidates:
        try:
            graph = int8_qdq(export_onnx(fp32_module, example[:1]), x, stem_in_float=stem_in_float)
            net = build(name, graph, torch.get_num_threads())
            with torch.inference_mode():
                agree = float((net(check).argmax(1) == reference).float().mean())
            if not agree >= torch_agree - INT8_AGREEMENT_SLACK:
                raise RuntimeError(f"its int8 top-1 agrees with float on {agree:.1%} of the calibration inputs, "
                                   f"torch.ao's on {torch_agree:.1%}")
            built[name] = net
        except Exception as exc:
            if engine == OPENVINO:
                raise RuntimeError(f"engine=openvino cannot serve this int8 rung: {exc}") from exc
            log.warning("engine=%s: %s left out for an int8 rung (%s: %s)", engine, name, type(exc).__name__, exc)
    if not built:
        return torch_int8, None
    runners = built if engine == OPENVINO else {TORCH_AO: torch_int8, **built}
    choice = measure(runners, example, sizes, rounds)
    return FasterEngine(runners, choice), choice
