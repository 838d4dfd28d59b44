"""ONNX Runtime as an optional second engine for small networks, chosen per batch size by
measurement on the serving thread.

Why: torch's eager mode pays a fixed cost per operator (oneDNN primitive look-up, dispatch,
the GIL between layers), about a millisecond per forward pass of a small MobileNet on one
thread, which is most of the pass at batch 1: the bundled PSS-Net's `min` rung takes about
1.4 ms in torch and 0.12 ms in ONNX Runtime at batch 1 on an AVX-512 CPU.  In full batches
the two engines trade places by network (ONNX Runtime 1.6-2x faster on some rungs, 2x
slower on a pruned rung with odd channel counts; docs/BENCHMARKS.md), so neither is always
the faster: each network gets both, timed at each batch size, and every batch runs on the
engine that was faster at the nearest measured size below it.

ONNX Runtime is an optional dependency (``pip install anytime-serve[onnx]``: onnxruntime, plus
onnx for torch's exporter); without it everything runs on torch.  Export happens in memory
at start-up, so nothing is written to disk and a checkpoint never needs a converted copy.
"""

from __future__ import annotations

import io
import logging
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

TORCH, ONNXRUNTIME = "torch", "onnxruntime"
ENGINES = ("auto", TORCH, ONNXRUNTIME)  # what a family's ``engine`` setting accepts
# The largest difference from torch's output that ONNX Runtime's may show, relative to the
# output's own scale: float rounding in another kernel order is about 1e-6 of it (2e-5 on
# logits of about 20, docs/BENCHMARKS.md); anything near 1e-3 is a different computation.
AGREEMENT_TOLERANCE = 1e-3

log = logging.getLogger("anytime.engines")


def available() -> bool:
    """Whether ONNX Runtime and the ``onnx`` package torch's exporter needs are installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise RuntimeError("engine=onnxruntime needs ONNX Runtime: pip install 'anytime-serve[onnx]' "
                           "(onnxruntime and onnx), or use engine=auto / torch")


class OrtNetwork:
    """A torch module exported to ONNX (in memory) and run by an ONNX Runtime CPU session:
    float32 (n, ...) tensor in, float32 tensor out, the batch axis dynamic.  Calling it is safe
    to call from several threads (ONNX Runtime sessions are)."""

    def __init__(self, module: torch.nn.Module, example: torch.Tensor, threads: int) -> None:
        import onnxruntime as ort

        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(module.eval(), (example.contiguous(),), buf, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Its worker threads would otherwise spin between passes, taking a core from the
        # event loop (the server leaves one core for HTTP, decoding and encoding).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
        self.onnx_bytes = len(buf.getvalue())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {"x": array})[0])


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


def measure(runners: dict[str, Callable[[torch.Tensor], object]], example: torch.Tensor, sizes: Sequence[int],
            rounds: int = 5) -> EngineChoice:
    """Time every runner at every size on ``example[:n]``, interleaved in a shuffled order
    (so that a slow moment of a shared machine falls on both), and choose the faster by the
    median.  Runs where it will serve: the caller's thread and its thread count."""
    sizes = tuple(sorted({1, *sizes}))
    samples: dict[str, dict[int, list[float]]] = {k: {n: [] for n in sizes} for k in runners}
    order = [(k, n) for k in runners for n in sizes]
    with torch.inference_mode():
        for k, n in order:  # warm-up: first passes allocate and pick kernels
            runners[k](example[:n])
        for _ in range(rounds):
            random.shuffle(order)
            for k, n in order:
                reps = max(1, 16 // n)
                t0 = time.perf_counter()
                for _ in range(reps):
                    runners[k](example[:n])
                samples[k][n].append((time.perf_counter() - t0) / reps)
    ms = {k: tuple(1000 * statistics.median(per[n]) for n in sizes) for k, per in samples.items()}
    engines = tuple(min(ms, key=lambda k: ms[k][i]) for i in range(len(sizes)))
    return EngineChoice(sizes, engines, ms)


class FasterEngine:
    """A network served on whichever engine ``choice`` says is faster for the batch's size."""

    def __init__(self, runners: dict[str, Callable[[torch.Tensor], torch.Tensor]], choice: EngineChoice) -> None:
        self.runners, self.choice = runners, choice

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.runners[self.choice.engine(int(x.shape[0]))](x)


def serve_faster(module: torch.nn.Module, torch_runner: Callable[[torch.Tensor], torch.Tensor],
                 example: torch.Tensor, sizes: Sequence[int], engine: str = "auto",
                 rounds: int = 5) -> tuple[Callable[[torch.Tensor], torch.Tensor], EngineChoice | None]:
    """``module``'s runner for ``engine``: "torch" returns ``torch_runner`` as it is;
    "onnxruntime" an ONNX Runtime session at every size; "auto" (ONNX Runtime installed) both,
    measured at ``sizes`` on ``example`` and chosen per size.  ``example`` holds at least
    max(sizes) items of what the network is served; the exported graph is traced on it, and
    its output on all of ``example`` must agree with torch's (``AGREEMENT_TOLERANCE``).  Where
    export, the session or that agreement fails, "auto" serves torch (with a warning) and
    "onnxruntime" raises."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == TORCH or (engine == "auto" and not available()):
        return torch_runner, None
    if engine == ONNXRUNTIME:
        require()
    try:
        ort_net = OrtNetwork(module, example[:1], torch.get_num_threads())
        with torch.inference_mode():
            want = torch_runner(example)
            gap = float((ort_net(example) - want).abs().max()) / (1.0 + float(want.abs().max()))
        if not gap <= AGREEMENT_TOLERANCE:  # NaN included
            raise RuntimeError(f"its ONNX Runtime output differs from torch's by {gap:.2g} of the output's scale "
                               f"(more than {AGREEMENT_TOLERANCE:g})")
    except Exception as exc:
        if engine == ONNXRUNTIME:  # asked for by name: say why it cannot be had
            raise RuntimeError(f"engine=onnxruntime cannot serve {type(module).__name__}: {exc}") from exc
        # auto is the default: a network the exporter or ONNX Runtime cannot run as torch does
        # is served by torch, never refused
        log.warning("engine=auto: torch serves %s (%s: %s)", type(module).__name__, type(exc).__name__, exc)
        return torch_runner, None
    runners = {TORCH: torch_runner, ONNXRUNTIME: ort_net}
    if engine == ONNXRUNTIME:
        runners = {ONNXRUNTIME: ort_net}
    choice = measure(runners, example, sizes, rounds)
    return FasterEngine(runners, choice), choice
