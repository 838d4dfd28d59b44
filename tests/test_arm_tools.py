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


@pytest.mark.slow
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


@pytest.mark.slow
def test_training_pauses_on_the_quiet_file_and_stops_after(photo_dirs, tmp_path: Path, capsys) -> None:
    import threading
    import time

    quiet = tmp_path / "quiet"
    quiet.write_text("")
    threading.Timer(0.5, quiet.unlink).start()
    out = tmp_path / "run"
    t0 = time.time()
    train.main(["--backbone", "fsrcnn", "--batch", "2", "--out", str(out), "--train-images", str(photo_dirs[0]),
                "--val-images", str(photo_dirs[1]), "--iters", "6", "--stop-after", "3", "--log-every", "3",
                "--threads", "1", "--pause-file", str(quiet)])
    text = capsys.readouterr().out
    assert "pausing" in text and "resuming" in text and "stopped at iteration 3 of 6" in text
    assert time.time() - t0 >= 0.5
    assert (out / "train_state.pt").exists() and not (out / "model.safetensors").exists()
    train.main(["--backbone", "fsrcnn", "--batch", "2", "--out", str(out), "--train-images", str(photo_dirs[0]),
                "--val-images", str(photo_dirs[1]), "--iters", "6", "--log-every", "3", "--threads", "1",
                "--pause-file", ""])
    assert "resumed at iteration 3" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["paused_for_benchmarks_s"] >= 0.5


def test_data_splits_and_makefile_packages() -> None:
    import re

    from models.arm import data

    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    block = re.search(r"ARM_PHOTOS :=(.*?)\n", text)
    assert block and block.group(1).split() == list(data.PACKAGES) and "$(ARM_PHOTOS)" in text
    train_ext = [p.name for p in data.split("train-ext")]
    train, val = [p.name for p in data.split("train")], [p.name for p in data.split("val")]
    assert train_ext[:len(train)] == train and train_ext[len(train):] == list(data.EXTRA_PHOTOS)
    assert len(set(train_ext)) == len(train_ext) and set(train_ext).isdisjoint(val)
    assert sorted(val) == sorted(data.VALIDATION)


def test_data_splits_do_not_depend_on_the_installed_packages(tmp_path: Path, monkeypatch) -> None:
    """Any subset of the photo packages (none, here): the same splits, and loading a missing
    photo says what to install."""
    from models.arm import data

    installed = {s: [(p.name, p.path) for p in data.split(s)] for s in ("train", "train-ext", "val")}
    for attr in ("MATE_DIR", "PLASMA_DIR", "EXTRA_DIR"):
        monkeypatch.setattr(data, attr, tmp_path / attr)
    monkeypatch.setattr(data, "DATA_DIR", tmp_path / "cache")
    for s, photos in installed.items():
        assert [p.name for p in data.split(s)] == [name for name, _ in photos]
    for photo in data.split("val"):
        with pytest.raises(FileNotFoundError, match="apt-get install -y mate-backgrounds"):
            data.hr_lr_pair(photo)


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


def test_arm_forward_per_layer_times_every_leaf_of_every_subnet(capsys) -> None:
    from bench import arm_forward
    from tests.conftest import BUNDLED_ARM

    model = ArmSR.from_checkpoint(BUNDLED_ARM)
    names, table = arm_forward.per_layer(model, 2, rounds=2)
    leaves = [n for n, m in model.subnets[0].named_modules() if not any(True for _ in m.children())]
    assert names == leaves and "tail_conv.conv" in names  # the serving form's sub-pixel conv
    assert sorted(table) == [r.index for r in model.rungs[1:]]
    assert all(len(row) == len(names) and all(v > 0 for v in row) for row in table.values())
    arm_forward.main(["--checkpoint", str(BUNDLED_ARM), "--sizes", "1", "--rounds", "1", "--per-layer", "2",
                      "--threads", "1"])
    out = capsys.readouterr().out
    assert "ms per leaf layer, batch of 2 patches" in out and "| w56 |" in out
