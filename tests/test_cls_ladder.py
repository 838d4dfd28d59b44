"""One /classify ladder across methods: the bundled PSS-Net serves its supernet's subnets, the
dense variants other methods made (CLR-RNF pruning, DCFF compact training) and their int8
versions side by side; the planner picks among all of them by measured time and
validation accuracy, and a deadline or budget can be served by a pruned rung."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.bundled import bundled
from service.config import Settings
from tests.conftest import FAST_START, synthetic_photo, wait_ready

BUNDLE = bundled("pssnet")
pytestmark = [pytest.mark.slow,  # starts the app and times every rung
              pytest.mark.skipif(BUNDLE is None or not (BUNDLE.parent / "variants").is_dir(),
                                 reason="no bundled PSS-Net with variants (python -m models.pssnet.prune ... --out)")]


def _pruned(method: str) -> bool:
    """Filter pruning in either form: CLR-RNF cuts a trained network, DCFF trains a compact one."""
    return method.startswith("clr-") or method == "dcff"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(32, 32)).save(buf, format="PNG")
    return buf.getvalue()


def test_one_ladder_across_methods_is_listed_and_a_pruned_rung_serves() -> None:
    from service.app import create_app

    settings = Settings(**{**FAST_START, "families": ["pssnet"], "pssnet_checkpoint": BUNDLE})
    with TestClient(create_app(settings)) as c:
        wait_ready(c, timeout=180)
        [m] = c.get("/v1/models").json()["models"]
        rungs = {r["name"]: r for r in m["rungs"]}
        methods = {r["method"] for r in rungs.values()}
        assert "pss-net" in methods and any(_pruned(x) for x in methods), methods
        for r in rungs.values():  # every rung: held-out accuracy and a time measured at start-up
            assert 0 < r["accuracy"] <= 1 and r["ms_per_item_full_batch"] > 0, r
        front = [r for r in rungs.values() if not r["dominated"]]
        pruned = [r for r in front if _pruned(r["method"])]
        assert pruned, "no pruned rung on the front: " + ", ".join(f"{r['name']} ({r['method']})" for r in front)
        # The front, fastest first, must gain validation accuracy at every step (else one is dominated).
        by_time = sorted(front, key=lambda r: r["ms_per_item_full_batch"])
        assert all(a["val_accuracy"] < b["val_accuracy"] for a, b in zip(by_time, by_time[1:])), by_time
        variant = next(r for r in pruned if r["precision"] == "fp32") if any(
            r["precision"] == "fp32" for r in pruned) else pruned[0]
        made_by = "models.pssnet.compact" if variant["method"] == "dcff" else "models.pssnet.prune"
        assert variant["variant"]["command"].startswith(f"python -m {made_by}"), variant["variant"]["command"]

        top_ms = max(r["ms_per_item_full_batch"] for r in front)
        shares = sorted(x["ms_per_item_full_batch"] / top_ms for x in front)
        for r in pruned:  # a time budget at its share of the top's time picks exactly it
            share = r["ms_per_item_full_batch"] / top_ms
            dearer = [x for x in shares if x > share]
            # a hair above the share (the listed ms are rounded), still below the next dearer rung
            budget = min(share * 1.001, (share + dearer[0]) / 2) if dearer else share
            got = c.post("/classify", content=_png(), headers={"content-type": "image/png"},
                         params={"budget": f"{budget:.6f}"})
            assert got.status_code == 200 and got.json()["rung"]["name"] == r["name"], (r["name"], got.text)
            assert got.json()["rung"]["method"] == r["method"]

        # Deadline-driven: on an idle server a generous deadline buys the most accurate rung on
        # the front; a request that cannot be met is shed at once.
        best = max(front, key=lambda r: r["val_accuracy"])
        got = c.post("/classify", content=_png(), headers={"content-type": "image/png"},
                     params={"deadline_ms": 5000})
        assert got.status_code == 200 and got.json()["rung"]["name"] == best["name"], got.text
        assert got.headers["x-anytime-rung"] == best["name"]
