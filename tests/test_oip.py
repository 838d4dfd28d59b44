"""The Open Inference Protocol v2 (service/oip.py): the tensor codec and request checks
without a server, then the real clients - tritonclient's HTTP client and KServe's
InferenceRESTClient - against ``python -m service`` with every bundled model, in JSON and
with the binary data extension, including a shed request."""

from __future__ import annotations

import asyncio
import io
import json
import struct

import httpx
import numpy as np
import pytest
from PIL import Image

from service import oip
from service.errors import ApiError


def photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# --- the codec, without a server ---------------------------------------------------------------

def test_bytes_tensors_round_trip_through_the_binary_encoding() -> None:
    values = np.array([b"", b"a", b"\x00\xff" * 300], dtype=object)
    raw = oip.serialize_bytes(values)
    assert raw[:4] == struct.pack("<I", 0) and len(raw) == 3 * 4 + 0 + 1 + 600
    assert oip.deserialize_bytes(raw, 3, "X") == list(values)
    with pytest.raises(ApiError, match="runs past"):
        oip.deserialize_bytes(raw[:-1], 3, "X")
    with pytest.raises(ApiError, match="left after"):
        oip.deserialize_bytes(raw + b"x", 3, "X")


def test_inputs_from_json_and_from_binary_data_agree() -> None:
    pixels = photo(4, 5)
    as_json = oip.parse_inputs({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [4, 5, 3],
                                            "data": pixels.tolist()}]}, b"")  # nested lists
    as_binary = oip.parse_inputs({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [4, 5, 3],
                                              "parameters": {"binary_data_size": pixels.size}}]}, pixels.tobytes())
    np.testing.assert_array_equal(as_json["IMAGE"].data, pixels)
    np.testing.assert_array_equal(as_binary["IMAGE"].data, pixels)


@pytest.mark.parametrize("header, binary, message", [
    ({"inputs": []}, b"", "no 'inputs'"),
    ({"inputs": [{"name": "IMAGE", "datatype": "UINT7", "shape": [1], "data": [1]}]}, b"", "datatype"),
    ({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [2, 2], "data": [1, 2, 3]}]}, b"", "3 values"),
    ({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [-1], "data": [1]}]}, b"", "shape"),
    ({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [4], "parameters": {"binary_data_size": 4}}]},
     b"abc", "does not fit"),
    ({"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}]},
     b"abcd", "8 expected"),
    ({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1], "data": [1]}]}, b"zz", "not claimed"),
    ({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1], "data": ["a"]}]}, b"", "numbers"),
    ({"inputs": [{"name": "IMAGE", "datatype": "INT8", "shape": [1], "data": [300]}]}, b"", "IMAGE"),
])
def test_malformed_inputs_are_400_with_the_reason(header: dict, binary: bytes, message: str) -> None:
    with pytest.raises(ApiError, match=message) as caught:
        oip.parse_inputs(header, binary)
    assert caught.value.status == 400


def test_huge_or_deeply_nested_tensors_are_refused_before_they_are_built() -> None:
    header = {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [100000, 100000, 3], "data": [0]}]}
    with pytest.raises(ApiError, match="over the limit") as caught:
        oip.parse_inputs(header, b"", max_elements=4_000_000)
    assert caught.value.status == 413
    deep: list = [0]
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ApiError, match="nested too deeply"):
        oip.json_data(deep, "UINT8", 1, "IMAGE")


def test_image_inputs_become_the_bytes_the_native_decoder_reads() -> None:
    from service.imageio import decode

    pixels = photo(6, 7)
    upload, raw = oip.image_upload({"IMAGE": oip.Tensor("IMAGE", "UINT8", pixels[None])})  # a batch of 1
    assert raw and np.array_equal(decode(upload.data, 10**6).rgb_u8, pixels)
    encoded = png(pixels)
    t = oip.Tensor("IMAGE", "BYTES", np.array([__import__("base64").b64encode(encoded)], dtype=object))
    assert oip.image_upload({"IMAGE": t})[0].data == encoded  # JSON strings carry base64
    with pytest.raises(ApiError, match="C = 1, 3 or 4"):
        oip.image_upload({"IMAGE": oip.Tensor("IMAGE", "UINT8", np.zeros((4, 4, 2), np.uint8))})
    with pytest.raises(ApiError, match="base64"):
        oip.image_upload({"IMAGE": oip.Tensor("IMAGE", "BYTES", np.array([b"\x89PNG"], dtype=object))})
    with pytest.raises(ApiError, match="missing"):
        oip.image_upload({})


# --- a real server and the real clients ---------------------------------------------------------

tritonclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a dev dependency")


@pytest.fixture(scope="module")
def models(server) -> dict[str, dict]:
    _proc, url = server
    return {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()["models"]}


def triton(url: str):
    return tritonclient.InferenceServerClient(url.removeprefix("http://"))


def inputs_for(model: dict, pixels: np.ndarray, binary: bool) -> list:
    """IMAGE as an encoded PNG (binary) or as UINT8 pixels (JSON), EXPRESSION for /ground."""
    if binary:
        image = tritonclient.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([png(pixels)], dtype=object), binary_data=True)
    else:
        image = tritonclient.InferInput("IMAGE", list(pixels.shape), "UINT8")
        image.set_data_from_numpy(pixels, binary_data=False)
    out = [image]
    if model["endpoint"] == "/ground":
        text = tritonclient.InferInput("EXPRESSION", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"the small red circle"], dtype=object), binary_data=binary)
        out.append(text)
    return out


def test_server_metadata_health_and_each_models_metadata(server, models) -> None:
    _proc, url = server
    c = triton(url)
    assert c.is_server_live() and c.is_server_ready()
    meta = c.get_server_metadata()
    assert meta["name"] == "anytime-serve" and "binary_tensor_data" in meta["extensions"]
    assert {"arm", "pssnet", "cfvit", "seqtr"} <= {m["family"] for m in models.values()}
    for name, m in models.items():
        assert c.is_model_ready(name) and c.is_model_ready(name, "1")
        md = c.get_model_metadata(name)
        assert md["name"] == name and md["versions"] == ["1"]
        assert [t["name"] for t in md["inputs"]][0] == "IMAGE"
        assert [r["name"] for r in md["parameters"]["rungs"]] == [r["name"] for r in m["rungs"]]
    assert not c.is_model_ready("no-such-model")
    r = httpx.get(f"{url}/v2/models/{next(iter(models))}/versions/7")
    assert r.status_code == 404 and "version" in r.json()["error"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infers_on_every_model(server, models, binary: bool) -> None:
    """Outputs match what the native endpoint answers for the same image and rung, and the
    response parameters say which rung served it and what it cost."""
    _proc, url = server
    c, pixels = triton(url), photo()
    for name, m in models.items():
        result = c.infer(name, inputs_for(m, pixels, binary), parameters={"deadline_ms": 5000})
        resp = result.get_response()
        p = resp["parameters"]
        assert p["rung"] in {r["name"] for r in m["rungs"]} | {"bicubic"}, p
        assert 0 < p["flops"] <= p["flops_full"] and p["compute_ms"] > 0 and p["decision"], p
        if m["endpoint"] == "/superresolve":
            out = result.as_numpy("IMAGE")
            sr = np.asarray(Image.open(io.BytesIO(out[0]))) if binary else out
            assert sr.shape == (4 * pixels.shape[0], 4 * pixels.shape[1], 3) and sr.dtype == np.uint8
            assert "predicted_patch_psnr" in p and "rung_mix" in p
            native = httpx.post(f"{url}/superresolve?rung={p['rung']}&budget_unit=time", content=png(pixels))
            pinned = c.infer(name, inputs_for(m, pixels, binary), parameters={"rung": p["rung"]})
            mine = pinned.as_numpy("IMAGE")
            mine = np.asarray(Image.open(io.BytesIO(mine[0]))) if binary else mine
            np.testing.assert_array_equal(mine, np.asarray(Image.open(io.BytesIO(native.content))))
        elif m["endpoint"] == "/classify":
            labels, probs = result.as_numpy("LABELS"), result.as_numpy("PROBABILITIES")
            native = httpx.post(f"{url}/classify?model={name}&rung={p['rung']}", content=png(pixels)).json()
            assert [x.decode() for x in labels] == [q["label"] for q in native["predictions"]]
            np.testing.assert_allclose(probs, [q["probability"] for q in native["predictions"]], atol=1e-6)
            assert list(result.as_numpy("CLASS_IDS")) == [q["index"] for q in native["predictions"]]
            assert 0 < p["expected_accuracy"] <= 1
        else:
            box = result.as_numpy("BOX")
            assert box.shape == (4,) and 0 <= box[0] <= box[2] <= pixels.shape[1] and 0 <= box[1] <= box[3]
            if m.get("task") == "mask":
                assert result.as_numpy("MASK").shape == pixels.shape[:2]
                assert result.as_numpy("POLYGON").shape[1:] == (2,)


def test_a_deadline_that_cannot_be_met_is_shed_with_retry_after(server, models) -> None:
    from tritonclient.utils import InferenceServerException

    _proc, url = server
    c, pixels = triton(url), photo()
    for name, m in models.items():
        with pytest.raises(InferenceServerException) as caught:
            c.infer(name, inputs_for(m, pixels, True), timeout=500)  # Triton's timeout: 500 us
        assert caught.value.status() == "429", (name, caught.value)
    # the same over plain HTTP: Retry-After, and the protocol's error shape
    body = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                                   "data": [__import__("base64").b64encode(png(pixels)).decode()]}],
                       "parameters": {"deadline_ms": 0.5}})
    name = next(n for n, m in models.items() if m["endpoint"] == "/classify")
    r = httpx.post(f"{url}/v2/models/{name}/infer", content=body)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and isinstance(r.json()["error"], str)


def test_bad_requests_get_4xx_in_the_protocols_shape(server, models) -> None:
    _proc, url = server
    name = next(n for n, m in models.items() if m["endpoint"] == "/classify")
    image = {"name": "IMAGE", "datatype": "UINT8", "shape": [2, 2, 3], "data": [0] * 12}
    cases = [
        (b"{not json", 400, "malformed JSON"),
        (json.dumps({"inputs": [image], "parameters": {"deadline": 5}}), 422, "unknown parameter"),
        (json.dumps({"inputs": [image], "parameters": {"priority": 2}}), 422, "priority"),
        (json.dumps({"inputs": [image], "parameters": {"top_k": 0}}), 422, "top_k"),
        (json.dumps({"inputs": [image], "outputs": [{"name": "BOX"}]}), 400, "not an output"),
        (json.dumps({"inputs": [{**image, "name": "PICTURE"}]}), 400, "IMAGE"),
    ]
    for body, status, message in cases:
        r = httpx.post(f"{url}/v2/models/{name}/infer", content=body)
        assert r.status_code == status and message in r.json()["error"], (body, r.status_code, r.text)
    r = httpx.post(f"{url}/v2/models/nobody/infer", content=json.dumps({"inputs": [image]}))
    assert r.status_code == 404 and "nobody" in r.json()["error"]
    r = httpx.post(f"{url}/v2/models/{name}/infer", content=b"{}", headers={"Inference-Header-Content-Length": "9"})
    assert r.status_code == 400
    metrics = httpx.get(f"{url}/metrics").text
    assert f'anytime_requests_total{{code="422",endpoint="/v2/models/{{name}}/infer",model="{name}"}}' in metrics


def test_kserve_rest_client_infers_on_every_model_in_json_and_binary(server, models) -> None:
    pytest.importorskip("kserve", reason="kserve is a dev dependency")
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    _proc, url = server
    pixels = photo()

    async def run() -> list:
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
        try:
            assert await client.is_server_ready(url)
            answers = []
            for name, m in models.items():
                assert await client.is_model_ready(url, name)
                for binary in (False, True):
                    image = InferInput("IMAGE", list(pixels.shape), "UINT8")
                    image.set_data_from_numpy(pixels, binary_data=binary)
                    inputs = [image]
                    if m["endpoint"] == "/ground":
                        text = InferInput("EXPRESSION", [1], "BYTES")
                        text.set_data_from_numpy(np.array([b"the small red circle"], dtype=object),
                                                 binary_data=binary)
                        inputs.append(text)
                    params = {"top_k": 3} if m["endpoint"] == "/classify" else {}
                    answers.append((m, await client.infer(url, InferRequest(name, inputs, parameters=params),
                                                          model_name=name)))
            return answers
        finally:
            await client.close()

    answers = asyncio.run(run())
    assert len(answers) == 2 * len(models)
    for m, answer in answers:
        outputs = {o.name: o.as_numpy() for o in answer.outputs}
        if m["endpoint"] == "/classify":
            assert outputs["PROBABILITIES"].shape == (3,) and len(outputs["LABELS"]) == 3
        elif m["endpoint"] == "/superresolve":
            assert outputs["IMAGE"].shape == (4 * pixels.shape[0], 4 * pixels.shape[1], 3)
        else:
            assert outputs["BOX"].shape == (4,)
        assert answer.parameters["rung"] and answer.parameters["compute_ms"] > 0
