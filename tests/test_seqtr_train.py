"""The SeqTR training command and metrics (models/seqtr/train.py, evaluate.py), on a few steps:
a loadable bundle with its manifest, resuming, --init from another bundle, evaluate()'s keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.seqtr import scenes
from models.seqtr import train as T
from models.seqtr.evaluate import evaluate, load, predict

torch.set_num_threads(1)

FAST = ["--n-train", "48", "--n-val", "6", "--n-test", "6", "--batch", "4", "--eval-every", "2", "--log-every", "1",
        "--pause-file", ""]


@pytest.fixture(scope="module")
def det_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seqtr-train")
    mp = pytest.MonkeyPatch()
    mp.setenv("ANYTIME_DATA_DIR", str(root / "data"))
    argv = ["--task", "det", "--name", "t-det", "--out", str(root / "run"), "--weights-dir", str(root / "w"),
            "--steps", "3", *FAST]
    assert T.main(argv + ["--stop-after", "2"]) is None  # interrupted: state saved at step 2
    st = torch.load(root / "run" / "train_state.pt", weights_only=True)
    assert st["step"] == 2
    out = T.main(argv)  # the same command resumes and finishes
    mp.undo()
    assert out == root / "w" / "t-det"
    return out


def test_bundle_and_manifest(det_bundle: Path) -> None:
    assert (det_bundle / "model.safetensors").exists()
    m = json.loads((det_bundle / "manifest.json").read_text())
    tr = m["training"]
    assert tr["resumed_from"] == [2] and tr["steps"] == 3
    assert tr["command"].startswith("python -m models.seqtr.train --task det")
    assert m["data"]["generator_version"] == scenes.GENERATOR_VERSION
    assert m["data"]["train"]["seed"] == scenes.SEEDS["train"] and m["data"]["test"]["seed"] == scenes.SEEDS["test"]
    s = m["metrics"]["summary"]
    for k in ("acc50", "miou_box", "acc50_held_out_phrasings", "wrong_expression_rate"):
        assert 0.0 <= s[k] <= 1.0
    assert m["config"]["task"] == "det" and m["vocab_words"][3:] == scenes.vocabulary_words()
    assert m["unknown_test_words"] == ["which"]


def test_loaded_bundle_evaluates(det_bundle: Path) -> None:
    model, vocab, manifest = load(det_bundle)
    assert vocab.words()[3:] == scenes.vocabulary_words()
    samples = scenes.generate("test", 5, workers=1)
    res = evaluate(model, samples, vocab, latency_images=2)
    for k in ("n", "acc50", "miou_box", "seen", "held_out", "by_phrasing", "by_kind", "wrong_expression",
              "latency_ms", "primary"):
        assert k in res
    assert res["n"] == 5 and res["primary"]["metric"] == "acc50"
    assert sum(v["n"] for v in res["by_phrasing"].values()) == 5
    assert 0 <= res["wrong_expression"]["rate"] <= 1 and res["latency_ms"]["single_median"] > 0
    p = predict(model, vocab, [samples[0].image], [samples[0].expression])[0]
    x1, y1, x2, y2 = p.box
    assert 0 <= x1 <= x2 <= 128 and 0 <= y1 <= y2 <= 128


def test_segm_from_det(det_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANYTIME_DATA_DIR", str(tmp_path / "data"))
    out = T.main(["--task", "segm", "--name", "t-segm", "--out", str(tmp_path / "run"), "--weights-dir",
                  str(tmp_path / "w"), "--steps", "1", "--init", str(det_bundle), "--num-points", "8", *FAST])
    m = json.loads((out / "manifest.json").read_text())
    init = m["training"]["init"]
    assert init["copied"] > 50  # encoder, fusion, transformer
    assert any("seq_positional_encoding" in k for k in init["skipped"])  # 5 det positions vs 2N+1
    assert 0.0 <= m["metrics"]["summary"]["miou_mask"] <= 1.0
    model, vocab, _ = load(out)
    res = evaluate(model, scenes.generate("val", 3, workers=1), vocab, latency_images=0)
    assert res["primary"]["metric"] == "miou_mask" and "acc50_mask" in res


def test_targets_and_lr() -> None:
    s = scenes.generate("train", 2, workers=1)
    arrays = scenes.SceneArrays(np.stack([x.image for x in s]), [x.expression for x in s],
                                np.array([x.box for x in s], np.float32), np.full((2, 48, 2), np.nan, np.float32),
                                np.array([len(x.polygon) for x in s], np.int16), [x.phrasing for x in s],
                                np.array([False, False]), {})
    for k, x in enumerate(s):
        arrays.polygons[k, : len(x.polygon)] = x.polygon
    det = T.make_targets(arrays, "det", 128, 12)
    assert det.shape == (2, 5) and (det[:, 4] == 128).all()
    assert det[0, 0] == int(s[0].box[0]) and det[0, 3] == min(int(s[0].box[3]), 127)
    seg = T.make_targets(arrays, "segm", 128, 12)
    assert seg.shape == (2, 25) and (seg[:, -1] == 128).all()
    # rounding quantisation: the served (lower-bin-edge) vertices are within half a pixel
    from models.seqtr.sequence import tokens_to_polygon
    pts = T.contour_points(arrays.polygon(0), 12)
    dec = tokens_to_polygon(seg[0].tolist(), 128, 128, 128)
    assert len(dec) == len(pts) == 12
    assert max(max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a, b in zip(dec, pts)) <= 0.5 + 1e-4
    assert T.lr_at(0, 100, 10, 1e-3, 0) == pytest.approx(1e-4)
    assert T.lr_at(10, 100, 10, 1e-3, 0) == pytest.approx(1e-3)
    assert T.lr_at(100, 100, 10, 1e-3, 1e-5) == pytest.approx(1e-5)


def test_init_from_train_state(det_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANYTIME_DATA_DIR", str(tmp_path / "data"))
    state = det_bundle.parent.parent / "run" / "train_state.pt"
    model = T.SeqTR(T.seqtr_tiny("det", vocab_size=len(scenes.vocabulary_words()) + 3, max_token=15))
    info = T.init_from(model, state)
    assert info["weights"] == "ema" and info["step"] == 3 and not info["skipped"]
    src = torch.load(state, weights_only=True)["ema"]
    assert all(torch.equal(v, src[k]) for k, v in model.state_dict().items())


def test_evaluate_cli(det_bundle: Path, tmp_path: Path, capsys) -> None:
    from models.seqtr import evaluate as E

    out = tmp_path / "r.json"
    E.main(["--checkpoint", str(det_bundle), "--n", "3", "--held-out", "yes", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["n"] == 3 and res["held_out"]["n"] == 3 and res["data"]["held_out_phrasings"] is True


def test_contour_points_keep_the_shape() -> None:
    from models.seqtr.raster import mask_iou

    for shape in scenes.SHAPES:
        poly = scenes.shape_polygon(shape, 60.3, 50.7, 14.2, 0.1)
        pts = T.contour_points(poly, 12)
        assert len(pts) == 12
        if len(poly) <= 12:
            assert all(p in pts for p in poly)  # every vertex kept, in order
            assert [p for p in pts if p in poly] == poly
        iou = mask_iou(scenes.rasterise(pts, 128, 128), scenes.rasterise(poly, 128, 128))
        assert iou > (0.99 if len(poly) <= 12 else 0.9)


def test_referent_map_puts_the_box_area_on_its_cells() -> None:
    # 8x8 grid of 16 px cells; a box covering all of cell (row 1, col 2) and half of (1, 3).
    box = torch.tensor([[32.0, 16.0, 56.0, 32.0]])
    m = T.referent_map(box, (8, 8), 16)
    assert m.shape == (1, 64) and m.sum().item() == pytest.approx(1.0)
    grid = m.view(8, 8)
    assert grid[1, 2].item() == pytest.approx(2 / 3) and grid[1, 3].item() == pytest.approx(1 / 3)
    assert grid.count_nonzero().item() == 2
    # The loss is lowest when the head's softmax matches the map, and the cells are row-major
    # like the encoder's flattened memory.
    head = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0]]))
    good = torch.zeros(1, 64, 2)
    good[0, 8 * 1 + 2, 0], good[0, 8 * 1 + 3, 0] = 10 + np.log(2.0), 10.0
    bad = torch.zeros(1, 64, 2)
    bad[0, 0, 0] = 10.0
    assert T.referent_loss(head, good, m) < T.referent_loss(head, bad, m)


def test_colour_probe_starts_grey_and_learns_cell_colours() -> None:
    probe = T.ColourProbe(c3=4, v=4)
    img = torch.zeros(2, 3, 32, 32)
    img[:, 0, :16] = 255.0  # top half red
    c3 = torch.zeros(2, 4, 4, 4)
    c3[:, 0, :2] = 1.0  # a feature that marks the red cells
    v = torch.zeros(2, 4, 2, 2)
    v[:, 0, :1] = 1.0
    first = probe.loss(img, c3, v).item()
    assert np.isfinite(first) and first < 50  # a grey guess, not a random one
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        loss = probe.loss(img, c3, v)
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first


def test_training_aids_run_and_are_recorded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANYTIME_DATA_DIR", str(tmp_path / "data"))
    argv = ["--task", "det", "--name", "t-aux", "--out", str(tmp_path / "run"), "--weights-dir", str(tmp_path / "w"),
            "--steps", "2", "--aux-weight", "1", "--colour-weight", "1", *FAST]
    out = T.main(argv)
    manifest = json.loads((out / "manifest.json").read_text())
    tr = manifest["training"]
    assert tr["aux_referent_weight"] == 1 and tr["aux_colour_weight"] == 1
    assert all(np.isfinite(e["aux_loss"]) and np.isfinite(e["colour_loss"]) for e in tr["log"])
    st = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert st["aux_head"] is not None and st["colour_probe"] is not None
    # the training-only heads are not part of the bundled model
    model, _, _ = load(out)
    assert set(model.state_dict()) == set(T.SeqTR(model.cfg).state_dict())


def test_probe_reads_a_linear_attribute_and_runs_on_a_bundle(det_bundle: Path, capsys) -> None:
    from models.seqtr import probe

    rng = np.random.default_rng(0)
    y = [str(v) for v in rng.integers(0, 3, 400)]
    x = rng.normal(size=(400, 5)).astype(np.float32)
    x[:, 0] += 4 * np.array([float(v) for v in y])  # attribute written on feature 0
    assert probe.probe_accuracy(x, y) > 0.95
    assert probe.probe_accuracy(x[:, 1:], y) < 0.6  # pure noise: near chance (1/3)
    probe.main(["--checkpoint", str(det_bundle), "--n", "12", "--threads", "1"])
    out = capsys.readouterr().out
    assert "| c3 |" in out and "| v |" in out and "majority class" in out


def test_choice_metrics_tell_the_wrong_object_from_a_loose_box(det_bundle: Path, monkeypatch) -> None:
    from models.seqtr import evaluate as E
    from models.seqtr.serving import Grounding

    samples = scenes.generate("test", 8)
    model, vocab, _ = load(det_bundle)

    def answering(pick):
        def fake_predict(_m, _v, images, expressions, batch=64):
            by_image = {id(s.image): s for s in samples}
            return [Grounding(pick(by_image[id(im)]), None, None, [], 1.0) for im in images]
        return fake_predict

    monkeypatch.setattr(E, "predict", answering(lambda s: s.box))
    res = E.evaluate(model, samples, vocab, wrong=False, latency_images=0)
    assert res["choice"]["right_object"] == 1.0 and res["choice"]["miou_box_when_right"] == pytest.approx(1.0)
    other = lambda s: s.objects[(s.target + 1) % len(s.objects)].box  # noqa: E731
    monkeypatch.setattr(E, "predict", answering(other))
    res = E.evaluate(model, samples, vocab, wrong=False, latency_images=0)
    assert res["choice"]["right_object"] == 0.0 and res["acc50"] == 0.0

    def loose(s):  # the right object, box shifted by half its width: IoU < 0.5 but still the best overlap
        x1, y1, x2, y2 = s.box
        d = (x2 - x1) / 2
        return (x1 + d, y1, x2 + d, y2)
    monkeypatch.setattr(E, "predict", answering(loose))
    res = E.evaluate(model, samples, vocab, wrong=False, latency_images=0)
    assert res["acc50"] == 0.0 and res["choice"]["right_object"] > 0.5


def test_word_dropout_turns_words_into_unk_and_never_touches_padding() -> None:
    from models.seqtr.text import PAD, UNK

    text = torch.tensor([[5, 6, 7, 8, PAD, PAD]] * 400)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(T.drop_words(text, 0.0, gen), text)
    out = T.drop_words(text, 0.25, gen)
    assert torch.equal(out[:, 4:], text[:, 4:])  # PAD stays PAD
    changed = out[:, :4] != text[:, :4]
    assert bool((out[:, :4][changed] == UNK).all())
    assert 0.2 < changed.float().mean().item() < 0.3
