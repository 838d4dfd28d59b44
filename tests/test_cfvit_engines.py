"""CF-ViT's two stages on ONNX Runtime and OpenVINO (``models.cfvit.engines``): the float
graphs give torch's logits and exits, the int8 graphs are rebuilt at start-up from the
bundle's stored calibration images with the held-out quality ``python -m models.cfvit.quantize``
measured, and the server lists which engine runs each stage and the quality of what it serves."""

from __future__ import annotations

import io
import json

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from compress.bf16 import native_bf16
from models.common import engines
from service.bundled import bundled
from service.config import Settings
from tests.conftest import FAST_START, synthetic_photo, wait_ready
from tests.test_engines import ONNX_ENGINES, needs_ov

CFVIT = bundled("cfvit")
needs_bundle = pytest.mark.skipif(CFVIT is None or not (CFVIT.parent / "int8.json").exists(),
                                  reason="no bundled CF-ViT with an int8 version (python -m models.cfvit.quantize)")


def _openvino_measured(manifest: str) -> bool:
    """Whether the bundle's version manifest (int8.json, bf16.json) holds OpenVINO's quality."""
    path = CFVIT.parent / manifest if CFVIT is not None else None
    return path is not None and path.exists() and "openvino" in json.loads(path.read_text()).get("engine_quality", {})


def _needs(manifest: str):
    return pytest.mark.skipif(not _openvino_measured(manifest), reason=f"the bundled CF-ViT's {manifest} has no "
                              "OpenVINO quality (its command, with OpenVINO installed)")


def _glyphs(model, n: int = 48) -> torch.Tensor:
    from models.cfvit.data import synthetic_shapes, to_tensor

    return to_tensor(synthetic_shapes(n, seed=3, size=model.input_size).images, model.config.mean, model.config.std)


@needs_bundle
@pytest.mark.parametrize("engine", ONNX_ENGINES)
def test_float_stages_on_another_engine_give_torch_s_logits_and_exits(engine) -> None:
    from models.cfvit.serving import CfVitModel

    model = CfVitModel.from_checkpoint(CFVIT, int8=False, bf16=False)
    x = _glyphs(model)
    eta = torch.tensor([0.0, 1.01, 0.5] * (len(x) // 3))  # every row exits, none does, and by confidence
    want = model.forward(x, eta)
    model.choose_engines(engine, sizes=(1, 8), rounds=1)
    runners = model.runners["fp32"]
    assert runners.engines() == {engine} and set(runners.describe()) == {"coarse", "fine"}
    got = model.forward(x, eta)
    assert torch.equal(got[1], want[1]), "the same rows exit"
    assert engines.gap_to(got[0], want[0]) <= engines.AGREEMENT_TOLERANCE
    assert torch.allclose(got[2], want[2], atol=1e-4)
    assert model.forward(x[:1], torch.tensor([1.01]))[0].shape == (1, model.config.num_classes)  # a batch of one
    model.choose_engines("torch")
    assert model.runners == {} and torch.equal(model.forward(x, eta)[0], want[0])


@needs_ov
@pytest.mark.slow  # renders and classifies the 5,000-image test split
@pytest.mark.parametrize("precision", [pytest.param("int8", marks=_needs("int8.json")), pytest.param(
    "bf16", marks=[_needs("bf16.json"), pytest.mark.skipif(not native_bf16("cpu"), reason="this CPU emulates bf16")])])
def test_reduced_precision_on_openvino_has_its_measured_quality(precision) -> None:
    """OpenVINO's int8 graphs (made at start-up from ``int8_calibration.safetensors``) and its
    bf16 graphs score on the held-out test fonts what the version's manifest says they
    scored, within half a point of fp32, and forward() serves exactly that network."""
    from models.cfvit import data
    from models.cfvit.engines import OnEngine
    from models.cfvit.evaluate import STAGES, evaluate_split
    from models.cfvit.serving import CfVitModel

    model = CfVitModel.from_checkpoint(CFVIT, int8=precision == "int8", bf16=precision == "bf16")
    if precision == "int8":
        assert model.int8_calibration is not None and model.int8_calibration.dtype == torch.float16
    model.choose_engines("openvino", sizes=(1, 32), rounds=1)
    assert model.served_engines(precision) == {"openvino"} and model.served_engines("fp32") == {"openvino"}
    meta = model.int8_meta if precision == "int8" else model.bf16_meta
    measured = meta["engine_quality"]["openvino"]
    fp32 = {r["rung"]: r["quality"]["test_accuracy_fp32"] for r in meta["rungs"]}
    net = model.int8_net if precision == "int8" else model.bf16_net
    split = data.load(model.meta["data"]["dataset"], "test")
    on_engine = OnEngine(net, model.runners[precision])
    got = evaluate_split(on_engine, split)
    for stage, key in STAGES:
        assert got[key] == pytest.approx(measured[stage]["test_accuracy"], abs=0.002), stage
        assert abs(measured[stage]["test_accuracy"] - fp32[stage]) <= 0.005, stage
    x = data.to_tensor(split.images[:64], model.config.mean, model.config.std)
    logits, exited, _ = model.forward(x, torch.full((64,), 0.5), **{precision: True})
    with torch.inference_mode():
        coarse, fine = on_engine.forward_all(x)
    assert torch.equal(logits[exited].argmax(1), coarse[exited].argmax(1))
    assert torch.equal(logits[~exited].argmax(1), fine[~exited].argmax(1))


@needs_ov
@_needs("int8.json")
@pytest.mark.slow  # a server start-up with the engines measured
def test_server_lists_each_stage_s_engine_and_the_quality_of_what_it_serves() -> None:
    from service.app import create_app

    settings = Settings(**{**FAST_START, "families": ["cfvit"], "cfvit_checkpoint": CFVIT,
                           "cfvit_engine": "openvino"})
    with TestClient(create_app(settings)) as c:
        wait_ready(c, timeout=120)
        [m] = c.get("/v1/models").json()["models"]
        rungs = {r["name"]: r for r in m["rungs"]}
        served = [p for p in ("int8", "bf16") if p in m["eta_curves"]]
        for precision in served:
            meta = json.loads((CFVIT.parent / f"{precision}.json").read_text())
            measured = meta.get("engine_quality", {}).get("openvino")
            for stage in ("coarse", "fine"):
                engine = rungs[f"{stage}-{precision}"]["engine"]
                if measured is None:  # no OpenVINO quality: torch's version only
                    assert engine in ("torch", "torch.ao")
                    continue
                assert set(engine["by_batch_size"].values()) == {"openvino"}
                assert rungs[f"{stage}-{precision}"]["test_accuracy"] == measured[stage]["test_accuracy"]
                assert rungs[f"{stage}-{precision}"]["backend"] == measured["backend"]
            if measured is not None:
                dense = {p["eta"]: p["accuracy"] for p in measured["eta_curve_dense"]}
                assert all(p["accuracy"] == dense[p["eta"]] for p in m["eta_curves"][precision])
        for stage in ("coarse", "fine"):
            assert set(rungs[stage]["engine"]["by_batch_size"].values()) == {"openvino"}
        buf = io.BytesIO()
        Image.fromarray(synthetic_photo(32, 32)).save(buf, format="PNG")
        for rung in ("fine", "coarse", *(f"{s}-{p}" for p in served for s in ("coarse", "fine"))):
            r = c.post("/classify", content=buf.getvalue(), headers={"content-type": "image/png"},
                       params={"rung": rung})
            assert r.status_code == 200 and r.json()["rung"]["name"] == rung, r.text


@needs_bundle
@pytest.mark.parametrize("engine", ONNX_ENGINES[:1])
def test_engine_choice_skips_batches_too_slow_to_measure(engine, monkeypatch) -> None:
    """A large network (an official DeiT-S: about 0.1 s an image here) is measured only at the
    sizes whose pass stays under the limit; larger batches take the largest measured size's engine."""
    from models.cfvit import serving
    from models.cfvit.serving import CfVitModel

    model = CfVitModel.from_checkpoint(CFVIT, int8=False, bf16=False)
    monkeypatch.setattr(serving, "ENGINE_PASS_LIMIT_S", 0.0)
    model.choose_engines(engine, sizes=(1, 8, 32), rounds=1)
    choice = model.runners["fp32"].choices["fine"]
    assert choice.sizes == (1,)
    x = _glyphs(model, 12)
    assert model.forward(x, torch.full((12,), 1.01))[0].shape == (12, model.config.num_classes)


@needs_ov
@_needs("int8.json")
def test_int8_graphs_are_made_as_the_manifest_says_they_were_measured(monkeypatch) -> None:
    """The options the int8 graphs were quantized with come from the bundle's int8.json, not
    from today's defaults: a bundle measured otherwise is rebuilt as it was measured."""
    import copy

    from models.cfvit.serving import CfVitModel

    model = CfVitModel.from_checkpoint(CFVIT, bf16=False)
    seen: list[dict] = []

    def record(graph, calibration, **kw):  # and stop there: engine=auto then keeps torch.ao
        seen.append(kw)
        raise RuntimeError("recorded")

    monkeypatch.setattr(engines, "int8_qdq", record)
    for graph in (model.int8_meta["engine_quality"]["openvino"]["graph"],
                  {"stem_in_float": True, "weight_layers_only": True, "symmetric_activations": False}):
        model.int8_meta = copy.deepcopy(model.int8_meta)
        model.int8_meta["engine_quality"]["openvino"]["graph"] = graph
        seen.clear()
        model.choose_engines("auto", sizes=(1,), rounds=1)
        assert len(seen) == 2 and all(kw == graph for kw in seen)  # one per stage
        assert model.served_engines("int8") == {"torch.ao"}
