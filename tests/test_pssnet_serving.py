"""PSS-Net serving: bundles, official checkpoints through the same class, and a training
smoke run (synthetic stand-in data) that resumes and writes a loadable bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.pssnet.calibrate import bn_stats, recalibrate_bn
from models.pssnet.checkpoint import save_bundle
from models.pssnet.nets import PssSupernet, SubnetConfig, demo_spec, extract_subnet, subnet_flops
from models.pssnet.serving import PssNetModel
from tests.test_pssnet_checkpoint import _synthesise


def _demo_bundle(tmp_path: Path) -> tuple[Path, PssSupernet, list[torch.Tensor], dict[str, SubnetConfig]]:
    torch.manual_seed(0)
    spec = demo_spec("mobilenet_v2", 5)
    net = PssSupernet(spec)
    calib = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    cfgs = {"max": spec.max_cfg(), "min": spec.min_cfg(),
            "f7": SubnetConfig(spec.model_name, 32, (0.8,) * 9).with_metric(spec, target=7)}
    stats = {}
    for name, cfg in cfgs.items():
        d = extract_subnet(net, cfg)
        recalibrate_bn(d, calib)
        stats[name] = bn_stats(d)
    # Leave the shared buffers polluted (as after training): serving must not use them.
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 32, 32) * 5 + 2, cfgs["max"])
    manifest = {"family": "pssnet", "name": "demo-test", "spec": spec.to_dict(), "classes": list("abcde"),
                "preprocess": {"kind": "demo", "resize": 32, "crop": 32, "mean": [0.485, 0.456, 0.406],
                               "std": [0.229, 0.224, 0.225]},
                "rungs": [{"name": n, "cfg": c.to_dict(), "flops": subnet_flops(spec, c), "params": 0,
                           "accuracy": {"val": 0.5, "test": 0.4}, "pool": {}} for n, c in cfgs.items()]}
    save_bundle(tmp_path / "bundle", net, stats, manifest)
    return tmp_path / "bundle", net, calib, cfgs


def test_bundle_serves_each_rung_on_its_own_statistics(tmp_path: Path) -> None:
    folder, net, calib, cfgs = _demo_bundle(tmp_path)
    model = PssNetModel.from_checkpoint(folder / "model.safetensors")
    assert model.name == "demo-test" and model.classes == list("abcde")
    assert [r.name for r in model.rungs] == ["min", "f7", "max"]
    assert [r.index for r in model.rungs] == [0, 1, 2]
    assert all(a.flops < b.flops for a, b in zip(model.rungs, model.rungs[1:]))
    assert model.rungs[1].accuracy == 0.4 and model.rungs[1].val_accuracy == 0.5
    assert model.rungs[2].params == sum(p.numel() for p in net.parameters())

    img = (np.random.default_rng(0).random((45, 60, 3)) * 255).astype(np.uint8)
    x = model.preprocess(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    batch = torch.stack([x, model.preprocess(img[:, ::-1])])
    for rung in model.rungs:
        cfg = SubnetConfig.from_dict(rung.cfg)
        ref_net = extract_subnet(net, cfg)
        recalibrate_bn(ref_net, calib)  # the same statistics, computed afresh
        with torch.no_grad():
            ref = ref_net(batch)
            shared = extract_subnet(net, cfg).eval()(batch)  # the polluted shared buffers
        out = model.forward(rung.index, batch)
        assert out.shape == (2, 5)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(out, shared, atol=1e-3)
    with pytest.raises(IndexError):
        model.forward(3, batch)
    assert model.preprocess(np.zeros((32, 32), np.uint8)).shape == (3, 32, 32)


def test_official_checkpoint_through_the_same_class(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_249.pt"
    _synthesise("mobilenet_v1", path)
    with pytest.raises(ValueError, match="every subnet writes into the same BN running buffers"):
        PssNetModel.from_checkpoint(path)
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((150 + 10 * i, 200, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"n{i:08d}\n" for i in range(1000)))
    model = PssNetModel.from_checkpoint(path, calibration=folder, calib_batches=1, calib_batch_size=2,
                                        class_names=names)
    assert model.classes[:2] == ["n00000000", "n00000001"] and len(model.classes) == 1000
    assert [r.name for r in model.rungs][0] == "min" and model.rungs[-1].name == "max"
    assert all(a.flops <= b.flops for a, b in zip(model.rungs, model.rungs[1:]))
    assert round(model.rungs[0].flops, 2) == 106.78 and round(model.rungs[-1].flops, 2) == 568.79
    assert all(r.accuracy is None for r in model.rungs)
    x = model.preprocess((rng.random((300, 400, 3)) * 255).astype(np.uint8))
    assert x.shape == (3, 224, 224)
    out = model.forward(1, x[None])
    assert out.shape == (1, 1000) and torch.isfinite(out).all()

    exported = model.export_bundle(tmp_path / "bundle")
    again = PssNetModel.from_checkpoint(exported)
    assert [r.name for r in again.rungs] == [r.name for r in model.rungs]
    torch.testing.assert_close(again.forward(1, x[None]), out)
    plain = PssNetModel.from_checkpoint(path, calibration=[torch.randn(2, 3, 224, 224)])
    assert plain.classes[:2] == ["class_0", "class_1"]


def test_training_smoke_resumes_and_writes_a_bundle(tmp_path: Path) -> None:
    from models.pssnet import train

    out = tmp_path / "run"
    args = ["--data", "synthetic", "--out", str(out), "--epochs", "2", "--batch", "16", "--max-train", "48",
            "--max-eval", "64", "--gen-map-num", "1500", "--calib-batches", "2", "--calib-batch-size", "16",
            "--pool-size", "2", "--log-every", "3", "--eval-every", "0", "--save-every", "3",
            "--grid", "2", "20", "6"]
    train.main(args)
    manifest = json.loads((out / "manifest.json").read_text())
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["iter"] == 6
    train.main(args)  # resumes at the end: only the final stage runs again
    again = json.loads((out / "manifest.json").read_text())
    assert [r["name"] for r in again["rungs"]] == [r["name"] for r in manifest["rungs"]]
    assert manifest["training"]["command"].startswith("python -m models.pssnet.train --data synthetic")
    assert manifest["training"]["iterations"] == 6 and manifest["training"]["data"]["train"] == 48
    flops = [r["flops"] for r in manifest["rungs"]]
    assert flops == sorted(flops) and manifest["rungs"][0]["name"] == "min" and manifest["rungs"][-1]["name"] == "max"
    for r in manifest["rungs"]:
        assert set(r["accuracy"]) == {"val", "test"} and r["params"] > 0
    model = PssNetModel.from_checkpoint(out)
    assert len(model.rungs) == len(manifest["rungs"]) and model.classes == manifest["classes"]
    assert model.forward(0, torch.zeros(2, 3, 32, 32)).shape == (2, 8)
