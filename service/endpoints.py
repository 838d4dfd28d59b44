"""The public inference endpoints: path, summary, query parameters and OpenAPI body of each.

Families that serve the same endpoint share its ``Endpoint`` (PSS-Net and CF-ViT share
/classify); the route itself is built by ``service/routes.py``.  A new family with a new
endpoint declares its own ``Endpoint`` beside it instead.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from service.body import IMAGE_TYPES
from service.family import Endpoint, RequestParams
from service.media import OFFERED


class SuperresolveParams(RequestParams):
    budget: str = Field("auto", description="a number in [0, 1]: the fraction of full width's predicted forward "
                        "time for this image (budget_unit=time, the default) or of its FLOPs (budget_unit=flops); "
                        "'auto' lets the planner choose from the deadline and the load (or uses the configured "
                        "default when there is no deadline); 'best': the table's best rung per patch")
    rung: str | None = Field(None, description="serve every patch at one rung (a name from /v1/models such as "
                             "'w56' or 'bicubic', or an index); overrides budget")
    tiling: Literal["full", "official"] = Field("full", description="'full' covers every pixel; 'official' "
                                                "reproduces ARM's tiling")
    objective: Literal["mse", "psnr_sum"] = Field("mse", description="with budget_unit=flops: 'mse' minimises "
                                                  "predicted squared error; 'psnr_sum' is the paper's rule (budgets "
                                                  "in time always minimise squared error)")
    explain: bool = Field(False, description="return the per-patch rung map (PNG at the input size, colours in "
                          "X-Anytime-Rung-Colours) instead of the image; plans but runs no network")


SUPERRESOLVE = Endpoint(
    "/superresolve", "Super-resolve an image x4 at the quality the deadline and the load allow",
    SuperresolveParams,
    responses={200: {"content": {t: {} for t in OFFERED},
                     "description": "the x4 image (or the rung map with explain=true); X-Anytime-* headers say "
                                    "which rungs served it, what it cost and how long it queued"}})


class ClassifyParams(RequestParams):
    top_k: int | None = Field(None, ge=1, le=100, description="how many labels to return (default: 5, or all "
                              "classes when fewer)")
    rung: str | None = Field(None, description="serve at this rung (a name from /v1/models): PSS-Net a subnet "
                                               "name or its int8 version ('f14-int8'), CF-ViT 'coarse' or 'fine' "
                                               "or their int8 and bf16 versions ('fine-int8', 'fine-bf16')")
    eta: float | None = Field(None, ge=0, le=1.01, description="CF-ViT: exit threshold (rows whose coarse "
                              "confidence reaches it stop early)")


CLASSIFY = Endpoint(
    "/classify", "Classify an image at the quality the deadline and the load allow", ClassifyParams,
    responses={200: {"description": "top-k labels and probabilities, the rung used and the FLOPs spent; "
                                    "X-Anytime-* headers as for /superresolve"}})


ACCEPTED_GROUND_BODIES = ("multipart/form-data with a file field 'image' and a text field 'expression'; JSON "
                          "{\"image\": <base64>, \"expression\": ...}; or a raw image body with ?expression=")


class GroundParams(RequestParams):
    task: Literal["box", "mask"] = Field("box", description="box: a bounding box; mask: a contour polygon and "
                                                            "its mask")
    expression: str | None = Field(None, description="the referring expression (or a form / JSON field)")
    side: int | None = Field(None, ge=1, le=8192, description="serve at this rung (input long side, px)")
    mask_format: Literal["rle", "png", "none"] = Field("rle", description="task=mask: COCO RLE (uncompressed, "
                                                       "column-major), base64 PNG or none")
    explain: bool = Field(False, description="return the image with the answer drawn (PNG)")


GROUND = Endpoint(
    "/ground", "Find the object a referring expression describes (a box, or a mask)", GroundParams,
    responses={200: {"description": "JSON: box in original pixels, polygon and mask (task=mask), tokens, score, "
                                    "rung and FLOPs; with explain=true a PNG with the answer drawn. X-Anytime-* "
                                    "headers as for /superresolve",
                     "content": {"application/json": {}, "image/png": {}}}},
    request_body={"requestBody": {"required": True, "description": ACCEPTED_GROUND_BODIES, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image", "expression"], "properties": {
            "image": {"type": "string", "format": "binary"}, "expression": {"type": "string"}}}},
        "application/json": {"schema": {"type": "object", "required": ["image", "expression"], "properties": {
            "image": {"type": "string", "format": "byte", "description": "the image file, base64"},
            "expression": {"type": "string"}}}},
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES}}}},
    selects_by=("task",))
