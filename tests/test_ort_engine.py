"""ONNX Runtime as PSS-Net's second engine: each batch runs on the engine measured faster at
its size, the ONNX graph computes the same logits as torch, and the server lists the choice."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from models.common import ort_engine
from models.common.ort_engine import EngineChoice, measure, serve_faster
from service.bundled import bundled

needs_ort = pytest.mark.skipif(not ort_engine.available(),
                               reason="ONNX Runtime not installed (pip install 'anytime-serve[onnx]')")


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


@pytest.fixture(scope="module")
def pss_and_glyphs():
    path = bundled("pssnet")
    if path is None:
        pytest.skip("no bundled PSS-Net")
    from models.glyphs.data import load_split
    from models.pssnet.serving import PssNetModel

    model = PssNetModel.from_checkpoint(path, int8=False)
    test = load_split("test", n=400)
    x = torch.stack([model.preprocess(img) for img in test.images])
    return model, x, torch.as_tensor(np.asarray(test.labels))


@needs_ort
def test_onnxruntime_rungs_compute_the_torch_logits(pss_and_glyphs) -> None:
    model, x, y = pss_and_glyphs
    torch_logits = {r.index: model.forward(r.index, x) for r in model.ladder}
    try:
        choices = model.choose_engines("onnxruntime", sizes=(1, 8), rounds=1)
        assert set(choices) == {r.index for r in model.ladder}
        for r in model.ladder:
            assert set(choices[r.index].engines) == {"onnxruntime"}
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
            assert set(choice.ms) == {"torch", "onnxruntime"}
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


@needs_ort
def test_a_network_onnx_runtime_cannot_run_as_torch_does_stays_on_torch(monkeypatch) -> None:
    """``auto`` is the default, so a network the exporter or ONNX Runtime gets wrong (or
    cannot take at all) is served by torch, not refused and not served wrong; asked for by
    name, ONNX Runtime says why it cannot be had."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    example = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    runner, choice = serve_faster(net, net.forward, example, sizes=(1, 4, 8), engine="auto", rounds=1)
    assert choice is not None  # a plain network: both engines, measured

    real_call = ort_engine.OrtNetwork.__call__
    monkeypatch.setattr(ort_engine.OrtNetwork, "__call__", lambda self, x: real_call(self, x) + 0.1)
    runner, choice = serve_faster(net, net.forward, example, sizes=(1, 4, 8), engine="auto", rounds=1)
    assert runner == net.forward and choice is None
    with pytest.raises(RuntimeError, match="differs from torch's"):
        serve_faster(net, net.forward, example, sizes=(1, 4, 8), engine="onnxruntime", rounds=1)

    def no_export(self, *args, **kwargs):
        raise RuntimeError("an operator the exporter does not know")

    monkeypatch.setattr(ort_engine.OrtNetwork, "__init__", no_export)
    runner, choice = serve_faster(net, net.forward, example, sizes=(1, 4, 8), engine="auto", rounds=1)
    assert runner == net.forward and choice is None
    with pytest.raises(RuntimeError, match="operator the exporter"):
        serve_faster(net, net.forward, example, sizes=(1, 4, 8), engine="onnxruntime", rounds=1)
