"""ONNX Runtime and OpenVINO beside torch for PSS-Net: each batch runs on the engine measured
faster at its size, the ONNX graph computes the same logits as torch on either engine, an
int8 rung runs on OpenVINO's int8 kernels only with its own measured quality, and the server
lists the choice."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.common import engines
from models.common.engines import EngineChoice, measure, serve_faster
from service.bundled import bundled

needs_ort = pytest.mark.skipif(not engines.available(),
                               reason="ONNX Runtime not installed (pip install 'anytime-serve[onnx]')")
needs_ov = pytest.mark.skipif(not engines.available(engines.OPENVINO),
                              reason="OpenVINO not installed (pip install 'anytime-serve[openvino]')")
ONNX_ENGINES = [pytest.param(engines.ONNXRUNTIME, marks=needs_ort), pytest.param(engines.OPENVINO, marks=needs_ov)]


def _sleeper(seconds_at: dict[int, float]):
    """A runner that takes ``seconds_at[n]`` for a batch of n (the largest key <= n)."""
    def run(x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        time.sleep(seconds_at[max(k for k in seconds_at if k <= n)])
        return x
    return run


def test_each_size_gets_the_engine_that_measured_faster_there() -> None:
    # "a" is free below 8 items and slow from 8 on; "b" costs the same at every size
    runners = {"a": _sleeper({1: 0.0, 8: 0.006}), "b": _sleeper({1: 0.003})}
    choice = measure(runners, torch.zeros(16, 1), sizes=(2, 4, 8, 16), rounds=3)
    assert choice.sizes == (1, 2, 4, 8, 16)
    assert choice.engines == ("a", "a", "a", "b", "b"), choice.ms
    assert all(choice.ms["a"][i] < choice.ms["b"][i] for i in range(3))


def test_an_engine_clearly_slower_everywhere_is_timed_once() -> None:
    calls: dict[str, int] = {"fast": 0, "slow": 0}

    def counted(name: str, seconds: float):
        def run(x: torch.Tensor) -> torch.Tensor:
            calls[name] += 1
            time.sleep(seconds)
            return x
        return run

    choice = measure({"fast": counted("fast", 0.0005), "slow": counted("slow", 0.004)}, torch.zeros(4, 1),
                     sizes=(2, 4), rounds=4)
    assert choice.engines == ("fast", "fast", "fast")
    # warm-up (one call per size) and one round (16, 8 and 4 repetitions at sizes 1, 2, 4): no more
    assert calls["slow"] == 3 + 16 + 8 + 4 and calls["fast"] == 3 + 4 * (16 + 8 + 4)


def test_a_batch_uses_the_choice_of_the_largest_measured_size_below_it() -> None:
    choice = EngineChoice((1, 4, 16), ("x", "y", "x"), {"x": (1, 2, 3), "y": (2, 1, 4)})
    assert [choice.engine(n) for n in (1, 2, 3, 4, 15, 16, 200)] == ["x", "x", "x", "y", "y", "x", "x"]
    described = choice.describe()
    assert described["by_batch_size"] == {"1": "x", "4": "y", "16": "x"}
    assert described["measured_ms"]["y"]["4"] == 1


def test_torch_engine_is_the_torch_runner_itself() -> None:
    net = torch.nn.Linear(3, 2)
    runner = net.forward
    got, choice = serve_faster(net, runner, torch.zeros(4, 3), sizes=(1, 4), engine="torch")
    assert got is runner and choice is None
    with pytest.raises(ValueError, match="engine must be one of"):
        serve_faster(net, runner, torch.zeros(4, 3), sizes=(1, 4), engine="tensorrt")


def _bundled_pss_and_glyphs(int8: bool, n: int):
    """The bundled PSS-Net (with or without its int8 rungs) and ``n`` held-out test glyphs."""
    path = bundled("pssnet")
    if path is None:
        pytest.skip("no bundled PSS-Net")
    from models.glyphs.data import load_split
    from models.pssnet.serving import PssNetModel

    model = PssNetModel.from_checkpoint(path, int8=int8)
    test = load_split("test", n=n)
    x = torch.stack([model.preprocess(img) for img in test.images])
    return model, x, torch.as_tensor(np.asarray(test.labels))


@pytest.fixture(scope="module")
def pss_and_glyphs():
    return _bundled_pss_and_glyphs(int8=False, n=400)


@pytest.mark.parametrize("engine", ONNX_ENGINES)
def test_each_engines_rungs_compute_the_torch_logits(pss_and_glyphs, engine: str) -> None:
    model, x, y = pss_and_glyphs
    torch_logits = {r.index: model.forward(r.index, x) for r in model.ladder}
    try:
        choices = model.choose_engines(engine, sizes=(1, 8), rounds=1)
        assert set(choices) == {r.index for r in model.ladder}
        for r in model.ladder:
            assert set(choices[r.index].engines) == {engine}
            ort_logits = model.forward(r.index, x)  # 400 items: the choice measured at 8
            assert ort_logits.dtype == torch.float32 and ort_logits.shape == torch_logits[r.index].shape
            assert float((ort_logits - torch_logits[r.index]).abs().max()) < 1e-3, r.name
            agree = (ort_logits.argmax(1) == torch_logits[r.index].argmax(1)).float().mean()
            assert float(agree) >= 0.995, (r.name, float(agree))
            one = model.forward(r.index, x[:1])
            assert torch.allclose(one, torch_logits[r.index][:1], atol=1e-3)
    finally:
        model.choose_engines("torch")
    assert not model.engine_choices  # back on torch alone
    assert torch.equal(model.forward(model.ladder[0].index, x), torch_logits[model.ladder[0].index])


@needs_ort
def test_auto_keeps_the_faster_engine_per_size(pss_and_glyphs) -> None:
    model, x, _ = pss_and_glyphs
    try:
        choices = model.choose_engines("auto", sizes=(1, 4, 32), rounds=3)
        for choice in choices.values():
            assert set(choice.ms) == {"torch", *engines.installed()}
            for i, engine in enumerate(choice.engines):
                assert choice.ms[engine][i] == min(ms[i] for ms in choice.ms.values())
    finally:
        model.choose_engines("torch")


@needs_ort
@pytest.mark.slow
def test_the_server_lists_each_rungs_engine_and_answers_on_it() -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings
    from tests.conftest import FAST_START, wait_ready

    path = bundled("pssnet")
    if path is None:
        pytest.skip("no bundled PSS-Net")
    settings = Settings(**{**FAST_START, "families": ["pssnet"], "pssnet_checkpoint": path,
                           "pssnet_engine": "onnxruntime", "pssnet_int8": False})  # int8: test_int8_rungs.py
    with TestClient(create_app(settings)) as c:
        wait_ready(c, timeout=180)
        [m] = c.get("/v1/models").json()["models"]
        fp32 = [r for r in m["rungs"] if r["precision"] == "fp32" and not r["dominated"]]
        assert fp32
        for r in m["rungs"]:
            engine = r["engine"]
            if isinstance(engine, dict):  # a ladder rung: ONNX Runtime at every size
                assert set(engine["by_batch_size"].values()) == {"onnxruntime"}, r
                assert engine["measured_ms"]["onnxruntime"]["1"] > 0
            else:  # off the ladder (dominated on validation): torch, never chosen by a planner
                assert engine == "torch" and r["dominated"], r
        ladder = [r for r in m["rungs"] if isinstance(r["engine"], dict)]
        assert ladder, "no rung on ONNX Runtime"
        from tests.test_cls_ladder import _png

        resp = c.post("/classify", params={"rung": ladder[0]["name"]}, content=_png(),
                      headers={"content-type": "image/png"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["rung"]["name"] == ladder[0]["name"]


@pytest.mark.parametrize("engine", ONNX_ENGINES)
def test_a_network_an_engine_cannot_run_as_torch_does_stays_on_torch(monkeypatch, engine: str) -> None:
    """``auto`` is the default, so a network the exporter or an engine gets wrong (or cannot
    take at all) is served by torch, not refused and not served wrong; asked for by name, the
    engine says why it cannot be had."""
    monkeypatch.setattr(engines, "installed", lambda: (engine,))  # auto tries this engine alone
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    example = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    runner, choice = serve_faster(net, net.forward, example, sizes=(1, 4, 8), engine="auto", rounds=1)
    assert choice is not None and set(choice.ms) == {"torch", engine}  # a plain network: both, measured

    cls = engines.OrtNetwork if engine == engines.ONNXRUNTIME else engines.OpenVinoNetwork
    real_call = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, x: real_call(self, x) + 0.1)
    runner, choice = serve_faster(net, net.forward, example, sizes=(1, 4, 8), engine="auto", rounds=1)
    assert runner == net.forward and choice is None
    with pytest.raises(RuntimeError, match="differs from torch's"):
        serve_faster(net, net.forward, example, sizes=(1, 4, 8), engine=engine, rounds=1)

    def no_export(*args, **kwargs):
        raise RuntimeError("an operator the exporter does not know")

    monkeypatch.setattr(engines, "export_onnx", no_export)
    runner, choice = serve_faster(net, net.forward, example, sizes=(1, 4, 8), engine="auto", rounds=1)
    assert runner == net.forward and choice is None
    with pytest.raises(RuntimeError, match="operator the exporter"):
        serve_faster(net, net.forward, example, sizes=(1, 4, 8), engine=engine, rounds=1)


@pytest.fixture(scope="module")
def pss_with_int8():
    return _bundled_pss_and_glyphs(int8=True, n=600)


@needs_ov
def test_int8_rungs_of_the_ladder_run_on_openvino_with_its_own_measured_quality(pss_with_int8) -> None:
    model, x, y = pss_with_int8
    ladder = {r.index for r in model.ladder}
    with_ov = {i for i, (_m, e) in model.int8_rungs.items() if "openvino" in e.get("engine_quality", {})}
    assert ladder & with_ov, "the bundle's int8.json holds no OpenVINO quality (quantize --engine-quality)"
    try:
        model.choose_engines("auto", sizes=(1, 8, 32), rounds=2)
        assert set(model.int8_engine_choices) == ladder & with_ov  # dominated subnets keep torch.ao
        for i, choice in model.int8_engine_choices.items():
            assert set(choice.ms) == {"torch.ao", "openvino"}
            entry = model.int8_rungs[i][1]
            ov, ao = entry["engine_quality"]["openvino"], entry["quality"]
            listed = model.int8_quality(i)
            served = set(choice.engines)
            assert listed["test_accuracy"] == min([ov["test_accuracy"]] * ("openvino" in served)
                                                  + [ao["test_accuracy"]] * ("torch.ao" in served))
            # what runs is a real int8 network close to the float rung, on whichever engine
            got = model.int8_forward(i, x).argmax(1)
            fp32 = model.forward(i, x).argmax(1)
            assert float((got == fp32).float().mean()) >= 0.95
            assert abs(float((got == y).float().mean()) - float((fp32 == y).float().mean())) <= 0.02
        model.choose_engines("torch")
        assert not model.int8_engine_choices  # engine=torch: torch.ao int8 only
        assert model.int8_quality(next(iter(with_ov)))["test_accuracy"] == \
            model.int8_rungs[next(iter(with_ov))][1]["quality"]["test_accuracy"]
    finally:
        model.choose_engines("torch")


@needs_ov
def test_an_int8_graph_that_disagrees_with_float_is_refused(pss_with_int8, monkeypatch) -> None:
    """An int8 path that is broken on this CPU (fbgemm's overflow on AVX-512 lost 80 points)
    must not be served: auto keeps torch.ao, engine=openvino says why."""
    model, x, _ = pss_with_int8
    i = model.ladder[-1].index
    net, module = model._nets[i], model.int8_rungs[i][0]
    inputs = model.int8_calibration[i][:64]
    real_call = engines.OpenVinoNetwork.__call__
    monkeypatch.setattr(engines.OpenVinoNetwork, "__call__", lambda self, b: real_call(self, b).flip(1))
    runner, choice = engines.serve_int8_faster(net, module, inputs, x[:8], sizes=(1, 8), engine="auto", rounds=1)
    assert runner is module and choice is None
    with pytest.raises(RuntimeError, match="agrees with float"):
        engines.serve_int8_faster(net, module, inputs, x[:8], sizes=(1, 8), engine="openvino", rounds=1)
    runner, choice = engines.serve_int8_faster(net, module, inputs, x[:8], sizes=(1, 8), engine="onnxruntime",
                                               rounds=1)
    assert runner is module and choice is None  # onnxruntime names the fp32 engine; int8 stays on torch.ao


class _TwoInTwoOut(torch.nn.Module):
    """A graph of two inputs (one of them integer indices) and two outputs, with an attention
    product of two activations: the shape of CF-ViT's fine stage."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        picked = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        attention = (self.q(picked) @ self.k(picked).transpose(1, 2)).softmax(-1)
        return attention.sum(1), picked.mean(1)


@pytest.mark.parametrize("engine", ONNX_ENGINES)
def test_a_graph_of_several_inputs_and_outputs_runs_as_torch_does(engine) -> None:
    net = _TwoInTwoOut().eval()
    tokens = torch.randn(8, 6, 8)
    keep = torch.stack([torch.randperm(6)[:4] for _ in range(8)])
    runner, choice = serve_faster(net, net, (tokens, keep), sizes=(1, 8), engine=engine, rounds=1,
                                  inputs=("tokens", "keep"), outputs=("attention", "mean"))
    assert choice is not None and set(choice.engines) == {engine}
    with torch.inference_mode():
        got, want = runner(tokens, keep), net(tokens, keep)
        assert isinstance(got, tuple) and len(got) == 2
        assert engines.gap_to(got, want) <= engines.AGREEMENT_TOLERANCE
        # another selection gives other outputs: the indices really are an input of the graph
        assert engines.gap_to(runner(tokens, (keep + 1) % 6), want) > 1e-3


@needs_ort
def test_weight_layers_only_leaves_products_of_activations_in_float() -> None:
    """int8_qdq(weight_layers_only=True) quantizes the linears and not attention's product of
    two activations (which made OpenVINO's CF-ViT graph slower than its float one)."""
    import onnx

    net = _TwoInTwoOut().eval()
    tokens = torch.randn(16, 6, 8)
    keep = torch.stack([torch.randperm(6)[:4] for _ in range(16)])
    graph = engines.export_onnx(net, (tokens[:1], keep[:1]), ("tokens", "keep"), ("attention", "mean"))
    products = engines.activation_products(onnx.load_from_string(graph))
    assert len(products) == 1

    def quantized_inputs(qdq: bytes) -> dict[str, int]:
        """Per MatMul / Gemm, how many of its inputs come from a DequantizeLinear."""
        g = onnx.load_from_string(qdq).graph
        dequantized = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
        return {n.name: sum(i in dequantized for i in n.input) for n in g.node if n.op_type in ("MatMul", "Gemm")}

    everything = quantized_inputs(engines.int8_qdq(graph, (tokens, keep), stem_in_float=False))
    weights_only = quantized_inputs(engines.int8_qdq(graph, (tokens, keep), stem_in_float=False,
                                                     weight_layers_only=True))
    assert everything[products[0]] == 2 and weights_only[products[0]] == 0
    assert all(v == 2 for k, v in weights_only.items() if k != products[0])  # the linears: input and weight


@needs_ov
def test_openvino_is_imported_without_writing_telemetry_into_home(tmp_path) -> None:
    """``import openvino`` alone writes a client ID and usage counts into ~/intel; the server's
    import declines that telemetry and leaves the environment as it was."""
    env = {**{k: v for k, v in os.environ.items() if k != "CI"}, "HOME": str(tmp_path)}
    code = ("import os; from models.common import engines; engines.import_openvino(); "
            "import openvino; assert 'CI' not in os.environ; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-1000:]
    assert list(tmp_path.iterdir()) == []
    # what this guards against (if OpenVINO stops writing there, import_openvino's workaround can go)
    plain = subprocess.run([sys.executable, "-c", "import openvino"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == 0 and (tmp_path / "intel").exists()


@needs_ort
def test_symmetric_activations_are_int8_with_zero_point_zero() -> None:
    """int8_qdq(symmetric_activations=True): every activation is quantized to int8 about 0
    (what lets OpenVINO fold the dequantization into its int8 product); the default is uint8
    with a zero point fitted to the observed range."""
    import onnx
    from onnx import numpy_helper

    net = _TwoInTwoOut().eval()
    tokens = torch.randn(16, 6, 8) + 0.5  # a range not centred on 0: the default needs a zero point
    keep = torch.stack([torch.randperm(6)[:4] for _ in range(16)])
    graph = engines.export_onnx(net, (tokens[:1], keep[:1]), ("tokens", "keep"), ("attention", "mean"))

    def activation_zero_points(qdq: bytes) -> list[np.ndarray]:
        g = onnx.load_from_string(qdq).graph
        init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        return [init[n.input[2]] for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in init]

    symmetric = activation_zero_points(engines.int8_qdq(graph, (tokens, keep), stem_in_float=False,
                                                        weight_layers_only=True, symmetric_activations=True))
    default = activation_zero_points(engines.int8_qdq(graph, (tokens, keep), stem_in_float=False,
                                                      weight_layers_only=True))
    assert symmetric and all(z.dtype == np.int8 and not z.any() for z in symmetric)
    assert default and all(z.dtype == np.uint8 for z in default) and any(z.any() for z in default)
