"""The classifiers' int8 rungs: real int8 kernels, rebuilt at start-up exactly as measured,
listed with held-out quality and measured time, and served through /classify next to the
fp32 rungs."""

from __future__ import annotations

import io
import json

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file

from compress.bf16 import native_bf16
from compress.calibration import batches_of
from compress.int8 import is_quantized
from service.bundled import bundled
from service.config import Settings
from tests.conftest import FAST_START, synthetic_photo, wait_ready

BUNDLE = bundled("pssnet")
CFVIT = bundled("cfvit")
needs_pssnet = pytest.mark.skipif(BUNDLE is None or not (BUNDLE.parent / "int8.json").exists(),
                                  reason="no bundled PSS-Net with int8 rungs (python -m models.pssnet.quantize)")
pytestmark = pytest.mark.slow  # each builds int8 networks (1.5 s a PSS-Net rung)
needs_cfvit = pytest.mark.skipif(CFVIT is None or not (CFVIT.parent / "int8.json").exists(),
                                 reason="no bundled CF-ViT with an int8 version (python -m models.cfvit.quantize)")


@pytest.fixture(scope="module")
def model():
    from models.pssnet.serving import PssNetModel

    return PssNetModel.from_checkpoint(BUNDLE)


@needs_pssnet
def test_int8_rungs_are_real_int8_and_rebuilt_exactly(model) -> None:
    """Every ladder rung has an int8 version on quantized kernels; the served one (rebuilt from
    the observers' state the bundle keeps) is the same network as one calibrated again on the
    stored inputs (so the manifest's held-out numbers are the served rung's), and it agrees
    with its fp32 rung on most inputs."""
    manifest = json.loads((BUNDLE.parent / "int8.json").read_text())
    calibration = load_file(str(BUNDLE.parent / "int8_calibration.safetensors"))
    observers = load_file(str(BUNDLE.parent / "int8_observers.safetensors"))
    assert {k.split("::")[0] for k in observers} == {e["rung"] for e in manifest["rungs"]}
    assert {model.rungs[i].name for i in model.int8_rungs} >= {r.name for r in model.ladder}
    for index, (q, entry) in model.int8_rungs.items():
        name = model.rungs[index].name
        assert is_quantized(q) and entry["real_speed"] and entry["bits"] == {"weights": 8, "activations": 8}
        key = entry["calibration"].get("key")
        inputs = (calibration[key] if key else calibration.get(name, calibration.get("shared"))).float()
        x = inputs[:32]
        with torch.inference_mode():
            if index in (min(model.int8_rungs), max(model.int8_rungs)):  # two rebuilds: 1.5 s each
                assert torch.equal(q(x), model.int8(index, batches_of(inputs))(x))
            agree = (q(x).argmax(1) == model.forward(index, x).argmax(1)).float().mean()
        assert agree >= 0.8, (name, float(agree))
        quality = entry["quality"]
        assert abs(quality["test_accuracy"] - quality["test_accuracy_fp32"]) <= 0.01, (name, quality)
    assert all("models.pssnet.quantize" in r["command"] for r in manifest["rungs"])


@needs_pssnet
def test_int8_rungs_are_listed_timed_and_served() -> None:
    settings = Settings(**{**FAST_START, "families": ["pssnet"], "pssnet_checkpoint": BUNDLE})
    from service.app import create_app

    with TestClient(create_app(settings)) as c:
        wait_ready(c, timeout=120)
        [m] = c.get("/v1/models").json()["models"]
        assert m["budget_units"] == ["time", "flops"]
        rungs = {r["name"]: r for r in m["rungs"]}
        int8 = [r for r in rungs.values() if r["precision"] == "int8"]
        assert int8 and all(r["real_speed"] and r["ms_per_item_full_batch"] > 0 and r["accuracy"] for r in int8)
        assert all(r["engine"] == "torch.ao" for r in int8)  # the default engine: torch for fp32 too
        assert all(r["engine"] == "torch" for r in rungs.values() if r["precision"] == "fp32")
        assert all(r["flops"] == rungs[r["subnet"]]["flops"] for r in int8)  # same network, same FLOPs
        buf = io.BytesIO()
        Image.fromarray(synthetic_photo(32, 32)).save(buf, format="PNG")
        top8 = max(int8, key=lambda r: r["flops"])["name"]
        r = c.post("/classify", content=buf.getvalue(), headers={"content-type": "image/png"},
                   params={"rung": top8})
        assert r.status_code == 200 and r.json()["rung"]["precision"] == "int8", r.text
        assert r.headers["x-anytime-rung"] == top8
        for budget in ("0", "0.5", "1"):  # time budgets pick among the rungs not dominated
            r = c.post("/classify", content=buf.getvalue(), headers={"content-type": "image/png"},
                       params={"budget": budget})
            assert r.status_code == 200 and not rungs[r.json()["rung"]["name"]]["dominated"], r.text


@needs_cfvit
def test_cfvit_int8_is_real_listed_and_served() -> None:
    """CF-ViT's int8 version: dynamic int8 linears (nothing to calibrate) and a static int8
    stem rebuilt from the bundle's stored ranges, its held-out quality and val curve from the
    bundle, both precisions timed and served."""
    from models.cfvit.serving import CfVitModel
    from service.app import create_app

    model = CfVitModel.from_checkpoint(CFVIT)
    assert model.int8_net is not None and is_quantized(model.int8_net) and not is_quantized(model.net)
    assert is_quantized(model.int8_net.patch_embed), "the stem should run on int8 kernels"
    # images inside the stem's calibrated range (Gaussian noise is far outside it)
    from models.cfvit.data import synthetic_shapes, to_tensor

    x = to_tensor(synthetic_shapes(64, seed=5, size=model.input_size).images, model.config.mean, model.config.std)
    fine = torch.full((64,), 1.01)
    agree = (model.forward(x, fine)[0].argmax(1) == model.forward(x, fine, int8=True)[0].argmax(1)).float().mean()
    assert agree >= 0.8
    for entry in model.int8_meta["rungs"]:
        q = entry["quality"]
        assert entry["real_speed"] and abs(q["test_accuracy"] - q["test_accuracy_fp32"]) <= 0.01, entry
    settings = Settings(**{**FAST_START, "families": ["cfvit"], "cfvit_checkpoint": CFVIT})
    with TestClient(create_app(settings)) as c:
        wait_ready(c, timeout=120)
        [m] = c.get("/v1/models").json()["models"]
        rungs = {r["name"]: r for r in m["rungs"]}
        assert {"coarse", "fine", "coarse-int8", "fine-int8"} <= set(rungs)
        assert set(m["eta_curves"]) == {"fp32", "int8"} | ({"bf16"} if native_bf16("cpu") else set())
        assert all(rungs[n]["ms_per_item_full_batch"] > 0 for n in rungs)
        buf = io.BytesIO()
        Image.fromarray(synthetic_photo(32, 32)).save(buf, format="PNG")
        r = c.post("/classify", content=buf.getvalue(), headers={"content-type": "image/png"},
                   params={"rung": "fine-int8"})
        assert r.status_code == 200 and r.json()["rung"]["precision"] == "int8", r.text
        assert r.json()["rung"]["name"] == "fine-int8" and r.json()["flops"] == r.json()["flops_full"]


def test_static_int8_rebuilds_from_stored_ranges_exactly() -> None:
    """``observe_static`` keeps all a static int8 network needs: rebuilding from its stored
    ranges gives the network calibrated on the data itself, to the bit; ranges of another
    network are refused."""
    from torch import nn

    from compress.int8 import observe_static, quantize_static

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 2, stride=2)).eval()
    data = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    example = torch.zeros(1, 3, 16, 16)
    ranges = observe_static(net, data, example)
    assert ranges and all(isinstance(v, torch.Tensor) for v in ranges.values())
    direct, rebuilt = quantize_static(net, data, example), quantize_static(net, ranges, example)
    assert is_quantized(rebuilt)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(direct(x), rebuilt(x))
    other = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(ValueError, match="do not fit"):
        quantize_static(other, {k + "_x": v for k, v in ranges.items()}, example)
