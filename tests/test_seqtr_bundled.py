"""The bundled SeqTR demos (our training on the synthetic scenes): their manifests record
what they measured, a fresh sample of held-out scenes reproduces it, and the server serves
them by default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.seqtr import scenes
from models.seqtr.evaluate import evaluate
from models.seqtr.serving import SeqTRGrounder

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "seqtr" / "weights"
BUNDLES = sorted(p.parent for p in WEIGHTS.glob("*/model.safetensors"))

torch.set_num_threads(1)


@pytest.mark.skipif(not BUNDLES, reason="no bundled SeqTR demo")
@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_bundle_reproduces_its_held_out_metrics(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["training"]["command"].startswith("python -m models.seqtr.train")
    if manifest["data"]["generator_version"] != scenes.GENERATOR_VERSION:
        pytest.skip("the scene generator changed since this bundle was trained")
    g = SeqTRGrounder.from_bundle(bundle)
    summary = manifest["metrics"]["summary"]
    samples = scenes.generate("test", 150)  # the first 150 of the manifest's test scenes
    res = evaluate(g, samples, wrong=False)
    assert res["distractors"]["min"] >= 3
    key = "miou_mask" if g.task == "segm" else "acc50"
    # 150 scenes: a standard error of about 0.04 on a rate, less on a mean IoU.
    assert abs(res[key] - summary[key]) < 0.12, (key, res[key], summary[key])


def test_the_expression_decides_which_object() -> None:
    """Same image, an expression naming another object: the answer moves to that object in
    most scenes (a model that ignored the text could not)."""
    from models.seqtr.raster import box_iou

    det = [b for b in BUNDLES if json.loads((b / "manifest.json").read_text())["config"]["task"] == "det"]
    if not det:
        pytest.skip("no bundled SeqTR box model")
    g = SeqTRGrounder.from_bundle(det[0])
    rng = np.random.default_rng(0)
    samples = scenes.generate("test", 60)
    moved = 0
    for s in samples:
        other, j = scenes.wrong_expression(s, rng)
        a, b = g.ground(s.image, s.expression), g.ground(s.image, other)
        moved += box_iou(a.box, b.box) < 0.5 and box_iou(b.box, s.objects[j].box) >= 0.5
    assert moved / len(samples) > 0.5
