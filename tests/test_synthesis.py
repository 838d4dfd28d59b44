"""FDDA's and IntraQ's synthetic calibration sets (compress.synthesis) on a tiny BN network,
and the quantize command's new calibration choices."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.calibration import bn_layers, one_per_class
from compress.synthesis import (bns_mse_loss, fdda_centres, fdda_start_layer, fdda_synthesis, intraq_synthesis,
                                marginal_distance_loss, random_resized_crop, soft_targets)

CLASSES = 4
SHAPE = (3, 12, 12)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these run beside other jobs on a shared 2-core host."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _class_images(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is a colour and a bright quadrant: easy to learn, distinct in BN stats."""
    y = torch.arange(n) % CLASSES
    x = 0.3 * torch.randn((n, *SHAPE), generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, c % 3] += 1.0
        r, q = divmod(c, 2)
        x[i, :, r * 6:(r + 1) * 6, q * 6:(q + 1) * 6] += 1.5
    return x, y


@pytest.fixture(scope="module")
def net() -> nn.Module:
    """A small conv net with 5 BN layers, trained for a few seconds so that it classifies."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES))
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    m.train()
    for _ in range(60):
        x, y = _class_images(32, g)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    m.eval()
    x, y = _class_images(64, g)
    with torch.no_grad():
        assert (m(x).argmax(1) == y).float().mean() > 0.9
    return m


def _real_one_each(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _class_images(4 * CLASSES, torch.Generator().manual_seed(seed))
    pick = one_per_class(y, seed)
    return x[pick], y[pick]


def test_one_per_class_draws_one_of_each_class_and_depends_on_the_seed() -> None:
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    a, b = one_per_class(y, 0), one_per_class(y, 1)
    assert y[a].tolist() == [0, 1, 2] and y[b].tolist() == [0, 1, 2]
    assert any(not torch.equal(one_per_class(y, s), a) for s in range(1, 6))


def test_fdda_centres_are_each_real_images_own_bn_input_statistics(net) -> None:
    x, y = _real_one_each()
    c = fdda_centres(net, x, y)
    assert len(c.means) == len(bn_layers(net)) == 5
    assert c.means[2].shape == (CLASSES, 16) and c.variances[2].shape == (CLASSES, 16)
    # layer 0's input is the first convolution of the image alone: its spatial mean / biased variance
    with torch.no_grad():
        h = net[0](x[1:2])
    assert torch.allclose(c.means[0][1], h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(c.variances[0][1], h.var((0, 2, 3), unbiased=False), atol=1e-5)
    # centres differ per class, most of all in the deep layers FDDA uses
    deep = c.means[-1]
    assert torch.cdist(deep, deep)[~torch.eye(CLASSES, dtype=torch.bool)].min() > 1e-3
    assert c.correct.dtype == torch.bool and c.correct.all()
    with pytest.raises(ValueError):
        fdda_centres(net, torch.cat([x, x[:1]]), torch.cat([y, y[:1]]))  # two images of one class


def test_fdda_start_layer_is_the_deep_half() -> None:
    assert fdda_start_layer(27) == 12 and fdda_start_layer(20) == 8 and fdda_start_layer(52) == 24
    assert fdda_start_layer(3) == 0


def _class_centre_distance(net, images, labels, centres, start) -> float:
    """Mean over images of the deep-layer MSE between the image's own BN-input statistics and
    its class's centre (FDDA's centralised distance, image by image)."""
    own = fdda_centres(net, images, torch.arange(len(images)))  # each image alone, its own "class"
    rows = [centres.row(int(c)) for c in labels]
    d = [(own.means[l] - centres.means[l][rows]).pow(2).mean(1) + (own.variances[l] - centres.variances[l][rows])
         .pow(2).mean(1) for l in range(start, len(own.means))]
    return float(torch.stack(d).mean())


def test_fdda_synthesis_is_balanced_labelled_and_moves_each_class_to_its_centre(net) -> None:
    x, y = _real_one_each()
    centres = fdda_centres(net, x, y)
    out = fdda_synthesis(net, SHAPE, centres, n=2 * CLASSES + 1, steps=60, batch_size=6, seed=0)
    assert out.inputs.shape == (2 * CLASSES + 1, *SHAPE) and out.labels.shape == (2 * CLASSES + 1,)
    counts = torch.bincount(out.labels, minlength=CLASSES)
    assert counts.min() == 2 and counts.max() == 3
    assert all(b["last"] < 0.5 * b["first"] for b in out.info["per_batch"]), out.info["per_batch"]
    s = fdda_start_layer(len(bn_layers(net)))
    noise = torch.randn((len(out.labels), *SHAPE), generator=torch.Generator().manual_seed(0))
    assert _class_centre_distance(net, out.inputs, out.labels, centres, s) < \
        0.5 * _class_centre_distance(net, noise, out.labels, centres, s)
    with torch.no_grad():
        assert (net(out.inputs).argmax(1) == out.labels).float().mean() >= 0.9


def test_fdda_leaves_the_class_terms_out_for_a_misclassified_real_image(net) -> None:
    x, y = _real_one_each()
    centres = fdda_centres(net, x, y)
    centres.correct[1] = False
    out = fdda_synthesis(net, SHAPE, centres, n=CLASSES, steps=2, seed=0)
    assert out.info["classes_with_class_terms"] == CLASSES - 1


def test_intraq_gives_the_requested_set_and_lowers_its_loss(net) -> None:
    out = intraq_synthesis(net, SHAPE, CLASSES, n=10, steps=60, batch_size=4, seed=3)
    assert out.inputs.shape == (10, *SHAPE) and out.labels.shape == (10,)
    assert out.labels.dtype == torch.int64 and 0 <= int(out.labels.min()) and int(out.labels.max()) < CLASSES
    batches = out.info["per_batch"]
    assert len(batches) == 3 and batches[0]["with_centre"] == 0  # no earlier images: no class centre yet
    assert sum(b["with_centre"] for b in batches[1:]) > 0  # later batches see the centres of earlier ones
    assert all(b["last"] < 0.5 * b["first"] for b in batches), batches
    noise = torch.randn((10, *SHAPE), generator=torch.Generator().manual_seed(3))
    layers = bn_layers(net)

    def bns(images: torch.Tensor) -> float:
        seen = []
        hs = [m.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) for m, _, _ in layers]
        with torch.no_grad():
            net(images)
        for h in hs:
            h.remove()
        return float(bns_mse_loss(seen, layers))

    assert bns(out.inputs) < 0.5 * bns(noise)
    again = intraq_synthesis(net, SHAPE, CLASSES, n=10, steps=60, batch_size=4, seed=3)
    assert torch.equal(again.inputs, out.inputs) and torch.equal(again.labels, out.labels)  # seeded


def test_soft_targets_are_one_or_soft_in_half_of_the_images() -> None:
    t = soft_targets(4000, 0.6, torch.Generator().manual_seed(0))
    assert ((t >= 0.6) & (t <= 1)).all()
    assert 0.4 < float((t == 1).float().mean()) < 0.6


def test_marginal_distance_keeps_features_inside_the_band() -> None:
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    has = torch.tensor([True, True, True])
    same = c.clone()  # d = 0: m_low - 0 below the band
    opposite = -c  # d = 2: 2 - m_up above it
    inside = torch.tensor([[1.0, 1.0]] * 3)  # d = 1 - cos 45 deg = 0.29
    assert float(marginal_distance_loss(same, c, has, 0.05, 0.8)) == pytest.approx(0.05, abs=1e-4)
    assert float(marginal_distance_loss(opposite, c, has, 0.05, 0.8)) == pytest.approx(1.2, abs=1e-4)
    assert float(marginal_distance_loss(inside, c, has, 0.05, 0.8)) == pytest.approx(0.0, abs=1e-6)
    # images without a centre do not count
    assert float(marginal_distance_loss(opposite, c, torch.tensor([False, False, True]), 0.05, 0.8)) == \
        pytest.approx(1.2, abs=1e-4)


def test_random_resized_crop_keeps_the_shape_and_passes_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, 16, requires_grad=True)
    y = random_resized_crop(x, (0.5, 1.0), g)
    assert y.shape == x.shape and not torch.allclose(y, x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    whole = random_resized_crop(x.detach(), (1.0, 1.0), g, ratio=(1.0, 1.0))
    assert torch.allclose(whole, x.detach(), atol=1e-5)  # the full-size crop is the image itself


def test_quantize_accepts_the_new_calibration_choices() -> None:
    from models.pssnet.quantize import build_parser

    for choice in ("fdda", "intraq", "bns", "real", "noise"):
        args = build_parser().parse_args(["BUNDLE", "--calibration", choice, "--n", "54", "--steps", "3"])
        assert args.calibration == choice and args.n == 54 and args.steps == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["BUNDLE", "--calibration", "gdfq"])


@pytest.mark.slow
def test_quantize_calibrates_every_rung_with_fdda(capsys) -> None:
    """A dry run end to end (tiny sizes; about 2 min, most of it measuring five rungs on
    10,000 held-out images): every ladder rung gets a real int8 rung whose manifest entry
    records the method, its settings and the real images it read."""
    from models.pssnet.quantize import main
    from service.bundled import bundled

    from models.glyphs.data import load_split

    bundle = bundled("pssnet")
    if bundle is None:
        pytest.skip("no bundled PSS-Net")
    try:
        load_split("test")
    except Exception as e:  # the glyph images are rendered locally (make data), never committed
        pytest.skip(f"glyph splits unavailable: {e}")
    main([str(bundle.parent), "--calibration", "fdda", "--n", "6", "--steps", "2", "--dry-run"])
    entries = json.loads(capsys.readouterr().out)
    assert entries and all(e["calibration"]["source"] == "fdda" for e in entries)
    assert all(e["calibration"]["settings"]["method"] == "fdda" and e["real_speed"] for e in entries)
    assert all(e["calibration"]["real_images"] == {"split": "train", "per_class": 1, "pool": 512, "count": 54}
               for e in entries)
    assert all(e["quality"]["test_accuracy"] > 0.05 for e in entries)
