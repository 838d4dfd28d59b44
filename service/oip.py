"""The Open Inference Protocol (KServe data plane v2, as Triton speaks it) over REST, with the
binary tensor data extension, for every served model.

    GET  /v2                                          server metadata
    GET  /v2/health/live, /v2/health/ready            liveness, readiness
    GET  /v2/models/{name}[/versions/1]               model metadata (tensors, rungs)
    GET  /v2/models/{name}[/versions/1]/ready         model readiness
    POST /v2/models/{name}[/versions/1]/infer         inference

An infer request is translated into the native request of the model's endpoint and runs
through the same template (``FamilyService.handle``): the same planner, deadlines,
shedding (429 with Retry-After), limits, auth and metrics; only reading the body and
writing the answer differ.  The translation per endpoint (which tensors come in, which go
out) is an ``Adapter``; ``ADAPTERS`` holds one per native endpoint.

Tensors.  Images come as ``IMAGE``: BYTES of shape [1] holding the encoded file (PNG, JPEG,
WebP; base64 in a JSON body, raw in binary data) or UINT8 pixels [H, W, C] (C = 1, 3, 4; a
leading batch dimension of 1 is accepted).  Text (``EXPRESSION``) is BYTES [1], UTF-8.
Request ``parameters``: ``deadline_ms``, ``budget``, ``budget_unit``, ``min_budget``,
``policy``, the endpoint's own (``rung``, ``top_k``, ``task``, ...), and Triton's
``timeout`` (microseconds), which becomes the deadline when ``deadline_ms`` is absent.
``priority`` is refused unless 0: the scheduler orders work by deadline, and a priority
it ignored would be a promise not kept.  Response ``parameters``: the rung, FLOPs, the
predicted quality, budget, policy, and queue and compute milliseconds; the X-Anytime-*
headers are the native ones.

Errors have the protocol's shape, ``{"error": "<message>"}``, with the native status codes
(400 malformed, 404 unknown model or version, 413 too large, 422 bad parameter, 429 shed
with Retry-After, 503 not ready or draining).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from service import imageio
from service.body import Upload, read_limited
from service.errors import ApiError
from service.family import Answer, RequestParams
from service.serving import FamilyService

VERSION = "1"  # each served model has one version
HEADER_LENGTH = "Inference-Header-Content-Length"
DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
    "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}
MAX_DIMS = 8


def oip_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def from_api_error(exc: ApiError) -> JSONResponse:
    message = f"{exc.message} (accepted: {exc.accepted})" if exc.accepted else exc.message
    return oip_error(exc.status, message, exc.headers)


# --- tensors --------------------------------------------------------------------------------

@dataclass
class Tensor:
    """An input or output tensor: ``data`` is a numpy array (BYTES: an object array of bytes)."""

    name: str
    datatype: str
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)


def serialize_bytes(values: np.ndarray) -> bytes:
    """The binary extension's BYTES encoding: each element as a 4-byte little-endian length
    and its bytes, in row-major order."""
    return b"".join(struct.pack("<I", len(v)) + v for v in (as_bytes(x) for x in values.reshape(-1)))


def deserialize_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    out, at = [], 0
    for _ in range(count):
        if at + 4 > len(raw):
            raise ApiError(400, f"input {name!r}: binary BYTES data ends inside an element's length")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise ApiError(400, f"input {name!r}: binary BYTES element of {n} bytes runs past its data")
        out.append(raw[at:at + n])
        at += n
    if at != len(raw):
        raise ApiError(400, f"input {name!r}: {len(raw) - at} bytes left after {count} BYTES element(s)")
    return out


def as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def parse_shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_DIMS or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ApiError(400, f"input {name!r}: 'shape' must be a list of at most {MAX_DIMS} non-negative integers")
    return value


def parse_inputs(header: dict, binary: bytes, max_elements: int | None = None) -> dict[str, Tensor]:
    """The request's input tensors, from JSON ``data`` or from the binary section (in the
    order of the inputs that declare ``binary_data_size``), checked against their shapes;
    a tensor of more than ``max_elements`` elements is refused (413) before it is built."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, "the request has no 'inputs' list")
    tensors: dict[str, Tensor] = {}
    at = 0
    for spec in inputs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ApiError(400, "every input needs a string 'name'")
        name, datatype = spec["name"], spec.get("datatype")
        if datatype not in DTYPES:
            raise ApiError(400, f"input {name!r}: datatype {datatype!r} is not one of {', '.join(DTYPES)}")
        shape = parse_shape(spec.get("shape"), name)
        count = int(np.prod(shape, dtype=np.float64)) if shape else 1
        if max_elements is not None and count > max_elements:
            raise ApiError(413, f"input {name!r}: shape {shape} has {count} elements, over the limit of "
                                f"{max_elements} (max_input_pixels x 4 channels)")
        params = spec.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(binary):
                raise ApiError(400, f"input {name!r}: binary_data_size {size!r} does not fit the "
                                    f"{len(binary) - at} bytes of binary data left")
            raw, at = binary[at:at + size], at + size
            if datatype == "BYTES":
                data = np.empty(count, dtype=object)
                data[:] = deserialize_bytes(raw, count, name)
            else:
                itemsize = np.dtype(DTYPES[datatype]).itemsize
                if len(raw) != count * itemsize:
                    raise ApiError(400, f"input {name!r}: {len(raw)} bytes of binary data for shape {shape} of "
                                        f"{datatype} ({count * itemsize} expected)")
                data = np.frombuffer(raw, dtype=DTYPES[datatype])
        elif "data" in spec:
            data = json_data(spec["data"], datatype, count, name)
        else:
            raise ApiError(400, f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        if name in tensors:
            raise ApiError(400, f"input {name!r} is given twice")
        tensors[name] = Tensor(name, datatype, data.reshape(shape), params if isinstance(params, dict) else {})
    if at != len(binary):
        raise ApiError(400, f"{len(binary) - at} bytes of binary data are not claimed by any input")
    return tensors


def json_data(values: Any, datatype: str, count: int, name: str) -> np.ndarray:
    """JSON ``data``, flat or nested in row-major order.  BYTES elements are strings (UTF-8)."""
    flat = values if isinstance(values, list) else [values]
    if any(isinstance(v, list) for v in flat):
        try:
            flat = list(_flatten(flat))
        except RecursionError:
            raise ApiError(400, f"input {name!r}: 'data' is nested too deeply") from None
    if len(flat) != count:
        raise ApiError(400, f"input {name!r}: {len(flat)} values for a shape of {count} elements")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise ApiError(400, f"input {name!r}: BYTES data in JSON must be strings")
        out = np.empty(count, dtype=object)
        out[:] = [v.encode() for v in flat]
        return out
    if not all(isinstance(v, (int, float, bool)) for v in flat):
        raise ApiError(400, f"input {name!r}: {datatype} data must be numbers")
    try:
        return np.asarray(flat, dtype=DTYPES[datatype])
    except (OverflowError, ValueError) as exc:
        raise ApiError(400, f"input {name!r}: {exc}") from None


def _flatten(values: list):
    for v in values:
        if isinstance(v, list):
            yield from _flatten(v)
        else:
            yield v


# --- per endpoint -----------------------------------------------------------------------------

IMAGE_HELP = ("IMAGE as BYTES [1] (an encoded PNG, JPEG or WebP file; base64 in JSON data) or UINT8 pixels "
              "[H, W, C] with C = 1, 3 or 4")


def image_upload(tensors: dict[str, Tensor]) -> tuple[Upload, bool]:
    """The image input as the bytes the native path decodes, and whether it came as pixels.
    Pixels are stored as an uncompressed PNG (one copy: level 0 is no compression), so the
    native decoder's limits and checks apply to both forms alike."""
    t = tensors.get("IMAGE")
    if t is None:
        raise ApiError(400, f"input 'IMAGE' is missing (inputs: {', '.join(tensors) or 'none'})", IMAGE_HELP)
    if t.datatype == "BYTES":
        if t.data.size != 1:
            raise ApiError(400, f"input 'IMAGE': one encoded image per request (shape {t.shape})", IMAGE_HELP)
        raw = t.data.reshape(-1)[0]
        if "binary_data_size" not in t.parameters:  # JSON strings carry base64
            try:
                raw = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "input 'IMAGE': BYTES in JSON data must be the file in base64", IMAGE_HELP) \
                    from None
        return Upload(raw, {}), False
    if t.datatype != "UINT8":
        raise ApiError(400, f"input 'IMAGE': datatype {t.datatype} is not accepted", IMAGE_HELP)
    pixels = t.data[0] if t.data.ndim == 4 and t.data.shape[0] == 1 else t.data
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4) or 0 in pixels.shape:
        raise ApiError(400, f"input 'IMAGE': pixels of shape {t.shape} are not [H, W, C] with C = 1, 3 or 4",
                       IMAGE_HELP)
    channels = pixels.shape[2]
    return Upload(imageio.png_bytes(pixels[:, :, 0] if channels == 1 else pixels, compress_level=0), {}), True


def text_input(tensors: dict[str, Tensor], name: str) -> str | None:
    t = tensors.get(name)
    if t is None:
        return None
    if t.datatype != "BYTES" or t.data.size != 1:
        raise ApiError(400, f"input {name!r} must be BYTES of shape [1] (UTF-8 text)")
    try:
        return as_bytes(t.data.reshape(-1)[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"input {name!r} is not UTF-8 text") from None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class Adapter:
    """How one native endpoint speaks OIP: its tensors (for metadata and checks), how the
    inputs become the native upload (with fields the family reads), and how an answer
    becomes output tensors.  ``fixed`` are native parameters OIP requests always have."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    upload: Callable[[dict[str, Tensor]], Upload]
    tensors: Callable[[Answer, Upload], list[Tensor]]
    fixed: dict[str, Any] = field(default_factory=dict)


def sr_upload(tensors: dict[str, Tensor]) -> Upload:
    upload, pixels = image_upload(tensors)
    upload.fields["media"] = imageio.RAW_PIXELS if pixels else "image/png"
    return upload


def sr_tensors(answer: Answer, upload: Upload) -> list[Tensor]:
    body = answer.body
    assert isinstance(body, bytes)
    if upload.fields["media"] != imageio.RAW_PIXELS:
        return [Tensor("IMAGE", "BYTES", np.array([body], dtype=object))]
    h, w = (int(v) for v in answer.headers["X-Anytime-Output-Size"].split("x"))  # the family's header
    return [Tensor("IMAGE", "UINT8", np.frombuffer(body, dtype=np.uint8).reshape(h, w, -1))]


def classify_upload(tensors: dict[str, Tensor]) -> Upload:
    return image_upload(tensors)[0]


def classify_tensors(answer: Answer, upload: Upload) -> list[Tensor]:
    preds = answer.body["predictions"]  # type: ignore[index]
    return [Tensor("LABELS", "BYTES", np.array([p["label"].encode() for p in preds] or [], dtype=object)),
            Tensor("PROBABILITIES", "FP32", np.array([p["probability"] for p in preds], dtype=np.float32)),
            Tensor("CLASS_IDS", "INT64", np.array([p["index"] for p in preds], dtype=np.int64))]


def ground_upload(tensors: dict[str, Tensor]) -> Upload:
    upload = image_upload(tensors)[0]
    expression = text_input(tensors, "EXPRESSION")
    if expression is None:
        raise ApiError(400, "input 'EXPRESSION' (BYTES [1], the referring expression) is missing")
    upload.fields["expression"] = expression
    return upload


def ground_tensors(answer: Answer, upload: Upload) -> list[Tensor]:
    from models.seqtr.raster import rle_to_mask

    body: dict = answer.body  # type: ignore[assignment]
    out = [Tensor("BOX", "FP32", np.array(body["box"], dtype=np.float32)),
           Tensor("SCORE", "FP32", np.array([body["score"]], dtype=np.float32))]
    if body.get("task") == "mask":
        out.append(Tensor("POLYGON", "FP32", np.array(body["polygon"], dtype=np.float32).reshape(-1, 2)))
        out.append(Tensor("MASK", "UINT8", rle_to_mask(body["mask"]).astype(np.uint8)))
    return out


IMAGE = TensorSpec("IMAGE", "BYTES", [1])
ADAPTERS: dict[str, Adapter] = {
    "/superresolve": Adapter((IMAGE,), (TensorSpec("IMAGE", "BYTES", [1]),), sr_upload, sr_tensors,
                             {"explain": False}),
    "/classify": Adapter((IMAGE,), (TensorSpec("LABELS", "BYTES", [-1]), TensorSpec("PROBABILITIES", "FP32", [-1]),
                                    TensorSpec("CLASS_IDS", "INT64", [-1])), classify_upload, classify_tensors),
    "/ground": Adapter((IMAGE, TensorSpec("EXPRESSION", "BYTES", [1])),
                       (TensorSpec("BOX", "FP32", [4]), TensorSpec("SCORE", "FP32", [1]),
                        TensorSpec("POLYGON", "FP32", [-1, 2]), TensorSpec("MASK", "UINT8", [-1, -1])),
                       ground_upload, ground_tensors, {"explain": False, "mask_format": "rle"}),
}


# --- parameters -------------------------------------------------------------------------------

NOT_NATIVE = {"model", "explain", "expression", "mask_format", "binary_data_output", "timeout", "priority"}
SEQUENCES = ("sequence_id", "sequence_start", "sequence_end")


def native_params(svc: FamilyService, adapter: Adapter, parameters: Any) -> RequestParams:
    """The native query parameters of an OIP request: its ``parameters`` that the endpoint
    takes, Triton's ``timeout`` as the deadline, and the adapter's fixed ones."""
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise ApiError(400, "'parameters' must be an object")
    model_type = svc.endpoint.params
    accepted = sorted((set(model_type.model_fields) - NOT_NATIVE) | {"timeout"})
    values: dict[str, Any] = {}
    for key, value in parameters.items():
        if key == "binary_data_output":
            continue
        if key == "priority":
            if value not in (0, None):
                raise ApiError(422, f"priority={value!r} is not supported: this server runs work earliest deadline "
                                    "first; give the request a tighter deadline_ms instead")
            continue
        if key in SEQUENCES:
            raise ApiError(422, f"{key}: sequence batching is not supported (the models here are stateless)")
        if key == "timeout":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ApiError(422, f"timeout={value!r} must be a positive number of microseconds")
            if "deadline_ms" not in parameters:
                values["deadline_ms"] = value / 1000
            continue
        if key not in accepted:
            raise ApiError(422, f"unknown parameter {key!r} for {svc.name}",
                           f"parameters of {svc.name}: {', '.join(accepted)}")
        values[key] = str(value).lower() if isinstance(value, bool) else \
            str(value) if key == "budget" and isinstance(value, (int, float)) else value
    values.update(adapter.fixed, **svc.family.selection(), model=svc.name)  # /ground: the model's task
    try:
        params = model_type.model_validate(values)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ApiError(422, "; ".join(parts)) from None
    return params


# --- the response -----------------------------------------------------------------------------

def response_parameters(answer: Answer, served: dict) -> dict[str, Any]:
    """What the native answer reports about how it was served, as OIP response parameters."""
    params: dict[str, Any] = {"rung": answer.rung, "flops": answer.flops, "flops_full": answer.flops_full}
    body = answer.body if isinstance(answer.body, dict) else {}
    if body.get("expected_accuracy") is not None:
        params["expected_accuracy"] = body["expected_accuracy"]
    for header, key in (("X-Anytime-Predicted-Patch-PSNR", "predicted_patch_psnr"),
                        ("X-Anytime-Rung-Mix", "rung_mix")):
        if header in answer.headers:
            params[key] = float(answer.headers[header]) if key.endswith("psnr") else answer.headers[header]
    params.update({k: served[k] for k in ("budget", "policy", "decision", "queue_ms", "compute_ms") if k in served})
    return params


def render_infer(name: str, request_id: str | None, answer: Answer, served: dict, headers: dict[str, str],
                 upload: Upload, adapter: Adapter, wanted: dict[str, bool] | None, binary_default: bool) -> Response:
    """The infer response: JSON, or JSON plus binary tensors when any output asks for them."""
    outputs = adapter.tensors(answer, upload)
    if wanted is not None:
        outputs = [t for t in outputs if t.name in wanted]
    entries, blobs = [], []
    for t in outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        binary = wanted[t.name] if wanted is not None else binary_default
        if t.datatype == "BYTES" and not binary:
            values = t.data.reshape(-1)
            entry["data"] = [base64.b64encode(v).decode() if t.name == "IMAGE" else as_bytes(v).decode("utf-8")
                             for v in values]
        elif binary:
            blob = serialize_bytes(t.data) if t.datatype == "BYTES" else np.ascontiguousarray(t.data).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = t.data.reshape(-1).tolist()
        entries.append(entry)
    header: dict[str, Any] = {"model_name": name, "model_version": VERSION, "outputs": entries,
                              "parameters": response_parameters(answer, served)}
    if request_id is not None:
        header["id"] = request_id
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return Response(text, media_type="application/json", headers=headers)
    return Response(text + b"".join(blobs), media_type="application/octet-stream",
                    headers={**headers, HEADER_LENGTH: str(len(text))})


def requested_outputs(header: dict, adapter: Adapter) -> tuple[dict[str, bool] | None, bool]:
    """The outputs a request names (name -> binary) or None for all, and the default
    binary choice (``binary_data_output``)."""
    params = header.get("parameters") or {}
    binary_default = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    outputs = header.get("outputs")
    if outputs is None:
        return None, binary_default
    if not isinstance(outputs, list):
        raise ApiError(400, "'outputs' must be a list")
    names = {o.name for o in adapter.outputs}
    wanted: dict[str, bool] = {}
    for o in outputs:
        if not isinstance(o, dict) or o.get("name") not in names:
            raise ApiError(400, f"requested output {o.get('name') if isinstance(o, dict) else o!r} is not an output "
                                f"of this model ({', '.join(sorted(names))})")
        p = o.get("parameters") or {}
        wanted[o["name"]] = bool(p.get("binary_data", binary_default)) if isinstance(p, dict) else binary_default
    return wanted, binary_default


async def read_infer(request: Request, limit: int) -> tuple[dict, bytes]:
    """The request's JSON header and the binary section after it (binary data extension)."""
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise ApiError(415, f"Content-Encoding {request.headers['content-encoding']!r} is not accepted: send the "
                            "body uncompressed")
    raw = await read_limited(request, limit)
    declared = request.headers.get(HEADER_LENGTH)
    if declared is not None:
        if not declared.isdigit() or int(declared) > len(raw):
            raise ApiError(400, f"{HEADER_LENGTH} {declared!r} is not a length within the {len(raw)}-byte body")
        text, binary = raw[:int(declared)], raw[int(declared):]
    else:
        text, binary = raw, b""
    try:
        header = json.loads(text)
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ApiError(400, "the inference request must be a JSON object")
    return header, binary


# --- routes -----------------------------------------------------------------------------------

INFER_DESCRIPTION = ("An Open Inference Protocol v2 inference request (KServe v2 / Triton HTTP), JSON or with the "
                     "binary tensor data extension. Tensors per endpoint: " + "; ".join(
                         f"{path}: inputs {', '.join(t.name for t in a.inputs)}, outputs "
                         f"{', '.join(t.name for t in a.outputs)}" for path, a in ADAPTERS.items()) +
                     ". Parameters: deadline_ms, budget, budget_unit, min_budget, policy, the endpoint's own, and "
                     "Triton's timeout (microseconds). README.md, 'Open Inference Protocol v2'.")
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"]}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"]}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": f"the JSON header ({HEADER_LENGTH} bytes), then the "
                                                           "binary tensors"}}}}}

def router(services: list[FamilyService], version: str, ready: Callable[[], bool]) -> APIRouter:
    """The /v2 routes for ``services``; ``ready()`` is the server's readiness (/readyz)."""
    by_name = {s.name: s for s in services}
    r = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

    def lookup(name: str, model_version: str | None) -> FamilyService:
        svc = by_name.get(name)
        if svc is None:
            raise ApiError(404, f"unknown model {name!r}; served: {', '.join(by_name) or 'none'}")
        if model_version is not None and model_version != VERSION:
            raise ApiError(404, f"model {name!r} has no version {model_version!r} (versions: {VERSION})")
        if svc.endpoint.path not in ADAPTERS:
            raise ApiError(404, f"model {name!r} is not offered over OIP (endpoint {svc.endpoint.path})")
        return svc

    @r.get("", summary="Server metadata")
    async def server_metadata() -> dict:
        return {"name": "anytime-serve", "version": version, "extensions": ["binary_tensor_data"]}

    @r.get("/health/live", summary="Liveness")
    async def live() -> dict:
        return {"live": True}

    @r.get("/health/ready", summary="Readiness: every model calibrated and not draining")
    async def server_ready() -> Response:
        ok = ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def metadata(name: str, model_version: str | None = None) -> Response:
        try:
            svc = lookup(name, model_version)
        except ApiError as exc:
            return from_api_error(exc)
        adapter = ADAPTERS[svc.endpoint.path]
        tensors = lambda specs: [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in specs]  # noqa: E731
        outputs = [t for t in adapter.outputs if svc.family.selection().get("task") == "mask" or
                   t.name not in ("POLYGON", "MASK")]
        return JSONResponse({"name": svc.name, "versions": [VERSION], "platform": f"anytime-serve/{svc.family.family}",
                             "inputs": tensors(adapter.inputs), "outputs": tensors(outputs),
                             "parameters": {"endpoint": svc.endpoint.path,
                                            "rungs": [g.describe() for g in svc.family.rungs()]}})

    async def model_ready(name: str, model_version: str | None = None) -> Response:
        try:
            svc = lookup(name, model_version)
        except ApiError as exc:
            return from_api_error(exc)
        ok = svc.runtime.ready.is_set() and not svc.draining
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    async def infer(request: Request, name: str, model_version: str | None = None) -> Response:
        try:
            svc = lookup(name, model_version)
            request.state.model = svc.name  # error responses carry the model label too
            adapter = ADAPTERS[svc.endpoint.path]
            header, binary = await read_infer(request, svc.settings.max_body_bytes)
            params = native_params(svc, adapter, header.get("parameters"))
            wanted, binary_default = requested_outputs(header, adapter)
            upload = adapter.upload(parse_inputs(header, binary, 4 * svc.settings.max_input_pixels))
            request_id = header.get("id") if isinstance(header.get("id"), str) else None
            return await svc.handle(request, params, upload, lambda answer, served, headers: render_infer(
                svc.name, request_id, answer, served, headers, upload, adapter, wanted, binary_default))
        except ApiError as exc:
            return from_api_error(exc)

    for suffix in ("", "/versions/{model_version}"):
        r.add_api_route(f"/models/{{name}}{suffix}", metadata, methods=["GET"], summary="Model metadata")
        r.add_api_route(f"/models/{{name}}{suffix}/ready", model_ready, methods=["GET"], summary="Model readiness")
        r.add_api_route(f"/models/{{name}}{suffix}/infer", infer, methods=["POST"], summary="Inference",
                        openapi_extra=INFER_BODY, description=INFER_DESCRIPTION)
    return r
