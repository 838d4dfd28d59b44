"""Compatibility with the official ARM release: checkpoints, tables and the golden outputs
of the official code (the ``golden`` folder of the official fixtures, see conftest.py): tables,
edge scores and dispatch decisions exactly, float outputs to 1e-4 or closer."""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from models.arm.checkpoint import load_full_state, load_official_state_table
from models.arm.edge import edge_scores
from models.arm.nets import extract_subnet, get_backbone
from models.arm.pipeline import ArmSR
from models.arm.table import EdgeTable
from models.common.matlab_resize import downscale_x4_uint8, imresize

BACKBONES = ["fsrcnn", "carn"]


def _plan_kwargs(label: str) -> dict:
    if label == "best":
        return {"mode": "best"}
    if label.startswith("force"):
        return {"mode": "fixed", "rung": int(label[-1])}
    return {"mode": "eta", "eta": float(label[1:])}


@pytest.fixture(scope="module", params=BACKBONES)
def official_model(request, official: Path) -> tuple[str, ArmSR]:
    name = request.param
    # Nearest-bin look-up with the official table, exactly as the official code.
    return name, ArmSR.from_checkpoint(official / f"arm-{name}.pth", interpolate_table=False)


def test_state_dicts_have_the_official_layout(official: Path) -> None:
    fsrcnn, carn = load_full_state(official / "arm-fsrcnn.pth"), load_full_state(official / "arm-carn.pth")
    assert len(fsrcnn) == 20 and sum(v.numel() for v in fsrcnn.values()) == 24_515
    assert len(carn) == 54 and sum(v.numel() for v in carn.values()) == 294_171
    get_backbone("fsrcnn").build(56).load_state_dict(fsrcnn)  # strict: no missing or unexpected keys
    get_backbone("carn").build(64).load_state_dict(carn)


@pytest.mark.parametrize("name", BACKBONES)
def test_state_table_equals_json_export(official: Path, name: str) -> None:
    import json

    hmap = load_official_state_table(official / f"arm-{name}.state")
    table = EdgeTable.from_official_hmap(hmap)
    export = json.loads((official / "arm_lut_official.json").read_text())[name]
    np.testing.assert_array_equal(table.x_centers, export["x_centers"])
    np.testing.assert_array_equal(table.psnr, export["psnr_mean"])
    np.testing.assert_array_equal(table.cost, export["cost_list"])
    np.testing.assert_array_equal(table.counts, export["count"])


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.state"
    buf = io.BytesIO()
    torch.save({"hmap": Evil()}, buf)
    bad.write_bytes(buf.getvalue())
    with pytest.raises(pickle.UnpicklingError):
        load_official_state_table(bad)


@pytest.mark.parametrize("name", BACKBONES)
def test_per_width_outputs(golden: dict, official: Path, name: str) -> None:
    bb = get_backbone(name)
    state = load_full_state(official / f"arm-{name}.pth")
    x = torch.from_numpy(golden["inputs"]["patch_input_nchw"])
    ref = golden[name]["subnet_sr_float"]
    for i, w in enumerate(bb.widths):
        with torch.no_grad():
            out = extract_subnet(bb, state, w)(x).numpy()
        np.testing.assert_allclose(out, ref[i], rtol=0, atol=1e-5)


def test_bicubic_rung(golden: dict, official: Path) -> None:
    model = ArmSR.from_checkpoint(official / "arm-fsrcnn.pth")
    x = torch.from_numpy(golden["inputs"]["patch_input_nchw"])
    with torch.no_grad():
        out = torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
    np.testing.assert_allclose(out.numpy(), golden["inputs"]["bicubic_sr_float"], rtol=0, atol=1e-6)
    # The served rung is the same op, clamped.
    np.testing.assert_allclose(model.run_patches(0, x).numpy(), np.clip(golden["inputs"]["bicubic_sr_float"], 0, 1),
                               rtol=0, atol=1e-6)


def test_edge_scores_exact(golden: dict) -> None:
    inp = golden["inputs"]
    np.testing.assert_array_equal(edge_scores(inp["lr_patches_rgb"]), inp["fixed_patch_edge_score"])
    lr = inp["lr_rgb"]
    tiles = np.stack([lr[y:y + 32, x:x + 32] for y, x in inp["tile_pos_yx"]])
    np.testing.assert_array_equal(edge_scores(tiles), inp["tile_edge_score"])


def test_matlab_bicubic_lr(golden: dict) -> None:
    inp = golden["inputs"]
    np.testing.assert_allclose(imresize(inp["hr_rgb"], 0.25), inp["lr_imresize_float_rgb"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(downscale_x4_uint8(inp["hr_rgb"]), inp["lr_rgb"])


def test_tile_bins_predictions_and_decisions(golden: dict, official_model) -> None:
    name, model = official_model
    inp, ref, meta = golden["inputs"], golden[name], golden["json"]["backbones"][name]
    lr = inp["lr_rgb"]
    np.testing.assert_array_equal(model.table.bins(inp["tile_edge_score"]), ref["tile_lut_bin"])
    np.testing.assert_array_equal(model.table.predict_psnr(inp["tile_edge_score"]), ref["tile_pred_psnr"])
    for row, label in enumerate(ref["eta_labels"].tolist()):
        plan = model.plan(lr, tiling_mode="official", **_plan_kwargs(label))
        np.testing.assert_array_equal(plan.positions, inp["tile_pos_yx"])
        np.testing.assert_array_equal(plan.rungs, ref["tile_decisions"][row], err_msg=label)
        entry = meta["etas"][label]
        assert plan.rung_counts(4) == entry["num_res"]
        assert plan.flops / len(plan.rungs) == entry["flops_per_patch_mean"]
        assert plan.flops_fraction == entry["percent"]


def test_lut_probe_decisions(golden: dict, official_model) -> None:
    """Every bin of the table, through synthetic edge scores, for every eta label."""
    from models.arm import dispatch

    name, model = official_model
    probes = golden["json"]["backbones"][name]["lut_probe_decisions"]
    scores = np.asarray(probes["scores"], dtype=np.float64)
    pred = model.table.predict_psnr(scores)
    labels = [k for k in probes if k != "scores"]
    assert len(labels) == 9
    for label in labels:
        expected = probes[label]
        if label == "best":
            got = dispatch.best_rule(pred)
        elif label.startswith("force"):
            got = np.full(len(scores), int(label[-1]))
        else:
            got = dispatch.eta_rule(pred, model.table.cost, float(label[1:]) * model.table.cost[-1])
        np.testing.assert_array_equal(got, expected, err_msg=label)


def test_full_image_psnr_and_canvas(golden: dict, official_model) -> None:
    name, model = official_model
    inp, ref, meta = golden["inputs"], golden[name], golden["json"]["backbones"][name]
    lr, hr = inp["lr_rgb"], inp["hr_rgb"]
    for label in ref["eta_labels"].tolist():
        plan = model.plan(lr, tiling_mode="official", **_plan_kwargs(label))
        canvas = model.run(plan, lr.astype(np.float32) / 255) * 255
        ch, cw = (int(v) * 4 for v in plan.positions.max(axis=0) + 32)
        c, g = canvas[:ch, :cw].astype(np.float64), hr[:ch, :cw].astype(np.float64)
        mse = np.mean((c[4:-4, 4:-4] - g[4:-4, 4:-4]) ** 2)
        assert 20 * math.log10(255 / math.sqrt(mse)) == pytest.approx(meta["etas"][label]["psnr_rgb"], abs=1e-3)
        if label in ("best", "k1"):
            key = "best" if label == "best" else "tradeoff"
            x4 = np.rint(canvas[:ch, :cw] * 4)
            ref_x4 = ref[f"fullimage_{key}_sr_x4"].astype(np.float64)
            assert np.mean(x4 == ref_x4) >= 0.995 and np.abs(x4 - ref_x4).max() <= 4
            u8 = np.clip(np.rint(canvas[:ch, :cw]), 0, 255)
            assert np.abs(u8 - ref[f"fullimage_{key}_sr_u8"]).max() <= 1
