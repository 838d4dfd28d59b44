"""The bundled PSS-Net demo (our training on the glyph data): its manifest records measured
numbers and it serves them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.pssnet.nets import SubnetConfig, SupernetSpec, subnet_flops, subnet_params
from models.pssnet.serving import DOMINANCE_MARGIN, PssNetModel

BUNDLE = Path(__file__).resolve().parents[1] / "models" / "pssnet" / "weights" / "pss-mbv1-glyphs"


@pytest.fixture(scope="module")
def bundle() -> tuple[dict, PssNetModel]:
    if not (BUNDLE / "manifest.json").exists():
        pytest.skip("no bundled PSS-Net demo")
    return json.loads((BUNDLE / "manifest.json").read_text()), PssNetModel.from_checkpoint(BUNDLE, int8=False)


def test_manifest_is_consistent_with_the_model(bundle) -> None:
    manifest, model = bundle
    spec = SupernetSpec.from_dict(manifest["spec"])
    assert manifest["training"]["command"].startswith("python -m models.pssnet.train")
    assert manifest["training"]["wall_clock_s"]["train"] > 0
    subnets = [r for r in model.rungs if r.method == "pss-net"]
    assert [r.name for r in subnets] == [r["name"] for r in manifest["rungs"]]
    for r, m in zip(subnets, manifest["rungs"]):
        cfg = SubnetConfig.from_dict(m["cfg"])
        assert r.flops == pytest.approx(subnet_flops(spec, cfg), abs=1e-3) == pytest.approx(m["flops"], abs=1e-3)
        assert r.params == subnet_params(spec, cfg) == m["params"]
        assert 0 < m["accuracy"]["val"] <= 1 and 0 < m["accuracy"]["test"] <= 1
        assert r.accuracy == m["accuracy"]["test"]
    assert subnets[0].name == "min" and subnets[-1].name == "max"
    assert subnets[0].flops <= 0.35 * subnets[-1].flops
    assert subnets[-1].accuracy > subnets[0].accuracy


def test_every_bundled_variant_has_a_manifest_that_matches_its_network(bundle) -> None:
    """A dense variant (pruned or compact network) records the command that made it, its
    widths and FLOPs, which must be those of the network served, and held-out accuracy."""
    from models.pssnet.nets import count_params, widths_flops

    _, model = bundle
    variants = [r for r in model.rungs if r.method != "pss-net"]
    assert variants, "the bundle serves no variant"
    for r in variants:
        net = model._with_bn[r.index]
        assert r.variant["command"].startswith("python -m models.pssnet.")
        assert [net.widths.stem] + [b.cout for b in net.widths.blocks] == r.variant["widths"]
        assert r.flops == pytest.approx(widths_flops(net.spec, net.widths, net.resolution), abs=1e-3)
        assert r.params == count_params(net) and 0 < r.val_accuracy <= 1 and 0 < r.accuracy <= 1


def test_the_served_ladder_gains_accuracy_with_flops_on_held_out_data(bundle) -> None:
    """Rungs join the ladder on val (DOMINANCE_MARGIN above every cheaper one); on the
    held-out test split, which played no part in that choice, accuracy must rise with FLOPs."""
    _, model = bundle
    ladder = [r for r in model.rungs if not r.dominated]
    assert len(ladder) >= 3 and ladder[0].name == "min"
    assert ladder[0].flops <= 0.35 * ladder[-1].flops
    for cheaper, dearer in zip(ladder, ladder[1:]):
        assert dearer.flops > cheaper.flops and dearer.val_accuracy >= cheaper.val_accuracy + DOMINANCE_MARGIN
        assert dearer.accuracy > cheaper.accuracy, (cheaper.name, dearer.name)


def test_bundled_model_reproduces_its_test_accuracy(bundle) -> None:
    manifest, model = bundle
    try:
        from models.pssnet.data import load_demo_split

        test = load_demo_split("test")
    except Exception as e:  # the glyph data are generated locally, never committed
        pytest.skip(f"glyph test split unavailable: {e}")
    trained_on = manifest["training"]["data"]["source"]["test"]
    for key in ("generator_version", "font_index_key"):
        if test.source.get(key) != trained_on.get(key):
            pytest.skip(f"the glyph data changed since training ({key} {trained_on.get(key)} -> {test.source.get(key)})")
    n = 1000
    x = torch.stack([model.preprocess(img) for img in test.images[:n]])
    for rung in (model.rungs[0], model.rungs[-1], *[r for r in model.rungs if r.method != "pss-net"]):
        acc = float((model.forward(rung.index, x).argmax(1).numpy() == test.labels[:n]).mean())
        # The first 1000 of 5000 test images: within sampling error of the recorded accuracy.
        assert abs(acc - rung.accuracy) < 0.05, (rung.name, acc, rung.accuracy)
    assert np.isfinite(model.forward(0, x[:2]).numpy()).all()
