"""What the Open Inference Protocol costs over the native endpoints, per model.

    python -m bench.oip [--repeats 40] [--threads 1] [--url URL]

Starts the server (every bundled model, or ``--url`` for one already running) and, one
request at a time and interleaved, sends the same image at the same pinned rung (so the
compute is identical) to each model three ways: the native endpoint (raw PNG body),
OIP with the binary data extension (the PNG as BYTES, binary outputs) and OIP in plain
JSON (pixels as UINT8 JSON numbers, outputs as JSON). Prints the median and p90 of the
client-measured time per request and the OIP/native ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import struct
import time

import httpx
import numpy as np
from PIL import Image

from bench.server import start_server


def photo(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.random((h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
    return (255 * (0.7 * smooth + 0.3 * rng.random((h, w, 3)))).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def pinned_rung(model: dict) -> dict[str, str]:
    """A query that fixes the rung, so that every way computes the same thing."""
    if model["endpoint"] == "/ground":
        return {"side": str(model["rungs"][-1]["long_side"])}
    if model["family"] == "cfvit":
        return {"rung": "fine"}
    return {"rung": model["rungs"][-1]["name"] if model["endpoint"] == "/classify" else "w56"}


def requests_for(model: dict, pixels: np.ndarray) -> dict[str, tuple[str, dict, bytes, dict]]:
    """way -> (path, query, body, headers)."""
    name, endpoint, pin = model["name"], model["endpoint"], pinned_rung(model)
    encoded = png(pixels)
    expression = "the green star next to the yellow star"
    native_q = {"model": name, **pin}
    if endpoint == "/ground":
        native_q["task"] = model.get("task", "box")
        native_q["expression"] = expression
    native = (endpoint, native_q, encoded, {"content-type": "image/png"})
    params = {k: (int(v) if k == "side" else v) for k, v in pin.items()}
    inputs = [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
               "parameters": {"binary_data_size": 4 + len(encoded)}}]
    blobs = [struct.pack("<I", len(encoded)) + encoded]
    json_inputs = [{"name": "IMAGE", "datatype": "UINT8", "shape": list(pixels.shape),
                    "data": pixels.reshape(-1).tolist()}]
    if endpoint == "/ground":
        text = expression.encode()
        inputs.append({"name": "EXPRESSION", "datatype": "BYTES", "shape": [1],
                       "parameters": {"binary_data_size": 4 + len(text)}})
        blobs.append(struct.pack("<I", len(text)) + text)
        json_inputs.append({"name": "EXPRESSION", "datatype": "BYTES", "shape": [1], "data": [expression]})
    header = json.dumps({"inputs": inputs, "parameters": {**params, "binary_data_output": True}}).encode()
    binary = (f"/v2/models/{name}/infer", {}, header + b"".join(blobs),
              {"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"})
    plain = (f"/v2/models/{name}/infer", {}, json.dumps({"inputs": json_inputs, "parameters": params}).encode(),
             {"content-type": "application/json"})
    return {"native": native, "oip binary": binary, "oip json": plain}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--url", default=None, help="a running server instead of starting one")
    args = ap.parse_args(argv)
    proc = None
    if args.url:
        url = args.url
    else:
        proc, url = start_server(quiet=True, ANYTIME_TORCH_THREADS=str(args.threads))
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            models = c.get("/v1/models").json()["models"]
            print(f"{args.repeats} interleaved rounds, one request at a time, the same pinned rung each way; "
                  f"server torch threads {args.threads}; ms per request as the client sees it\n")
            print("| model | input | native ms (p90) | OIP binary ms (p90) | OIP JSON ms (p90) | binary / native | "
                  "JSON / native |")
            print("|---|---|---|---|---|---|---|")
            for m in models:
                side = (32, 32) if m["endpoint"] == "/classify" else (96, 128)
                ways = requests_for(m, photo(*side))
                times: dict[str, list[float]] = {w: [] for w in ways}
                for i in range(args.repeats + 2):
                    for way, (path, query, body, headers) in ways.items():
                        t = time.perf_counter()
                        r = c.post(path, params=query, content=body, headers=headers)
                        elapsed = time.perf_counter() - t
                        if r.status_code != 200:
                            raise SystemExit(f"{m['name']} {way}: {r.status_code} {r.text[:300]}")
                        if i >= 2:  # two warm-up rounds
                            times[way].append(1000 * elapsed)
                med = {w: statistics.median(v) for w, v in times.items()}
                p90 = {w: float(np.percentile(v, 90)) for w, v in times.items()}
                print(f"| {m['name']} | {side[1]}x{side[0]} | " +
                      " | ".join(f"{med[w]:.2f} ({p90[w]:.2f})" for w in ways) +
                      f" | {med['oip binary'] / med['native']:.2f} | {med['oip json'] / med['native']:.2f} |")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
