"""The command-line tools: training (resumable), table building and the download command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.arm import build_table, download, train
from models.arm.pipeline import ArmSR
from tests.conftest import synthetic_photo


@pytest.fixture(scope="module")
def photo_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("photos")
    for split, seeds in (("train", (1, 2)), ("val", (3,))):
        (root / split).mkdir()
        for s in seeds:
            Image.fromarray(synthetic_photo(192, 256, seed=s)).save(root / split / f"img{s}.png")
    return root / "train", root / "val"


def test_training_resumes_and_writes_weights_and_manifest(photo_dirs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    common = ["--backbone", "fsrcnn", "--batch", "4", "--out", str(out), "--train-images", str(photo_dirs[0]),
              "--val-images", str(photo_dirs[1]), "--save-every", "5", "--log-every", "5", "--threads", "1"]
    train.main(common + ["--iters", "5"])
    first = json.loads((out / "manifest.json").read_text())
    train.main(common + ["--iters", "10"])
    assert "resumed at iteration 5" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["iterations"] == 10 and first["training"]["iterations"] == 5
    assert manifest["training"]["command"].startswith("python -m models.arm.train ")
    assert manifest["training"]["data"]["train"] == ["img1", "img2"]

    # The table builder adds a table to the manifest; the model then loads and plans.
    build_table.main(["--checkpoint", str(out / "model.safetensors"), "--images", str(photo_dirs[1]),
                      "--step", "16", "--bins", "10", "--threads", "1"])
    table = json.loads((out / "manifest.json").read_text())["table"]
    assert len(table["x_centers"]) == 10 and len(table["mse_mean"]) == 4
    model = ArmSR.from_checkpoint(out / "model.safetensors")
    sr, plan = model.upscale(synthetic_photo(40, 50), budget=0.5)
    assert sr.shape == (160, 200, 3) and plan.flops_fraction <= 0.5


def test_download_verifies_sha256(official: Path, tmp_path: Path) -> None:
    got = download.download(tmp_path / "ckpt", ["fsrcnn"], mirror=str(official))
    assert sorted(p.name for p in got) == ["arm-fsrcnn.pth", "arm-fsrcnn.state"]
    model = ArmSR.from_checkpoint(tmp_path / "ckpt" / "arm-fsrcnn.pth")  # table from the .state beside it
    assert model.table.rungs == 4
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "arm-fsrcnn.pth").write_bytes(b"not the file")
    with pytest.raises(RuntimeError, match="sha256"):
        download.download(tmp_path / "ckpt2", ["fsrcnn"], mirror=str(bad))
    assert not (tmp_path / "ckpt2" / "arm-fsrcnn.pth").exists()


def test_missing_table_is_a_clear_error(official: Path, tmp_path: Path) -> None:
    lonely = tmp_path / "arm-fsrcnn.pth"
    lonely.write_bytes((official / "arm-fsrcnn.pth").read_bytes())
    with pytest.raises(FileNotFoundError, match="build_table"):
        ArmSR.from_checkpoint(lonely)
    assert ArmSR.from_checkpoint(lonely, require_table=False).table is None


def test_bundled_manifest_records_its_provenance() -> None:
    from tests.conftest import BUNDLED_ARM

    manifest = json.loads(BUNDLED_ARM.with_name("manifest.json").read_text())
    assert manifest["training"]["command"].startswith("python -m models.arm.train")
    assert set(manifest["training"]["data"]["val"]).isdisjoint(manifest["training"]["data"]["train"])
    assert manifest["table"]["source"].startswith("val split")
    results = manifest["metrics"]["results"]
    assert results["w56"]["psnr_rgb"] >= results["bicubic"]["psnr_rgb"] + 0.5
    assert np.isfinite(manifest["table"]["psnr_mean"]).all()
