"""SeqTR model package: text, sequences, pre-processing, rasterisation, decoding, loss, cost."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from models.seqtr.cost import seqtr_flops
from models.seqtr.model import SEQTR_DET, SEQTR_SEGM, SeqTR, seqtr_loss, seqtr_tiny
from models.seqtr.preprocess import collate, prepare
from models.seqtr.raster import box_iou, mask_iou, mask_to_rle, polygon_to_mask, rescale_polygon, rle_to_mask
from models.seqtr.sequence import (box_targets, dequantise, polygon_targets, quantise, sample_contour,
                                   tokens_to_box, tokens_to_polygon)
from models.seqtr.serving import GroundingItem, SeqTRGrounder
from models.seqtr.text import CLS, PAD, UNK, EmptyExpression, Vocabulary, clean_string, load_token_to_ix

torch.set_num_threads(1)


def _tiny(task: str = "det", seed: int = 0, **kw) -> SeqTR:
    torch.manual_seed(seed)
    return SeqTR(seqtr_tiny(task, vocab_size=20, **kw)).eval()


def _diversify(model: SeqTR, seed: int = 1) -> SeqTR:
    """An untrained model repeats one token; strong positions and logits make tokens vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.transformer.seq_positional_encoding.embedding.weight.normal_(0, 1, generator=g)
        model.head.predictor[2].fc.weight.mul_(10)
    return model


def _batch(model: SeqTR, b: int = 3, size: tuple[int, int] = (128, 128), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    img = torch.rand(b, 3, h, w, generator=g) * 255
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[1:, :, w - 32:] = True  # some padding
    t = model.cfg.max_token
    text = torch.randint(3, model.cfg.vocab_size, (b, t), generator=g)
    text[:, 3:] = PAD
    return img, mask, text


# ---------------------------------------------------------------------------- text


@pytest.mark.parametrize("expr,words", [
    ("The man's left-hand (red) shirt/jacket!", ["the", "mans", "left", "hand", "red", "shirt", "jacket"]),
    ('A "big"  cat; #1: *on* the: left?', ["a", "big", "cat", "1", "on", "the", "left"]),
    ("guy,in.black", ["guyinblack"]),
    ("UPPER-case\tTabs\nnewline", ["upper", "case", "tabs", "newline"]),
])
def test_clean_string(expr, words):
    assert clean_string(expr) == words


def test_encode_pad_unk_truncate_and_empty():
    v = Vocabulary.from_words(["red", "circle", "left"])
    assert v.token_to_ix["<pad>"] == PAD and v.token_to_ix["<unk>"] == UNK and v.token_to_ix["<cls>"] == CLS
    assert v.encode("Red circle!", 5) == [3, 4, PAD, PAD, PAD]
    assert v.encode("red zebra left", 4) == [3, UNK, 5, PAD]
    assert v.encode("red red red red red red", 3) == [3, 3, 3]
    assert v.unknown_words("the red zebra") == ["the", "zebra"]
    for bad in ("", "   ", "?!.", "(*)"):
        with pytest.raises(EmptyExpression):
            v.encode(bad, 5)
    assert issubclass(EmptyExpression, ValueError)
    v2 = Vocabulary.from_json(v.to_json())
    assert v2.token_to_ix == v.token_to_ix and len(v2) == 6


def test_token_to_ix_restricted_unpickler(tmp_path):
    good = tmp_path / "t2i.pkl"
    good.write_bytes(pickle.dumps({"<pad>": 0, "<unk>": 1, "<cls>": 2, "man": 3}))
    assert load_token_to_ix(good)["man"] == 3
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(flag), "w"))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        load_token_to_ix(bad)
    assert not flag.exists()
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"a": "b"}))
    with pytest.raises(ValueError):
        load_token_to_ix(wrong)


def test_gru_runs_over_pads_but_max_excludes_them():
    m = _tiny()
    enc = m.lan_enc
    ids = torch.tensor([[5, 6, 7]])
    short = torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], 1)
    long = torch.cat([ids, torch.zeros(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        f_short, f_long = enc(short), enc(long)
        # max_token matters: the backward GRU direction sees the PADs first.
        assert not torch.allclose(f_short, f_long, atol=1e-6)
        out, _ = enc.lstm(enc.embedding(long))
        assert torch.allclose(f_long, out[:, :3].amax(1))
        assert not torch.allclose(f_long, out.amax(1))  # pads would change the max
    with pytest.raises(ValueError):
        enc(torch.zeros(1, 4, dtype=torch.long))


# ------------------------------------------------------------------------ sequence


def test_quantise_lower_bin_edge():
    x = np.array([0.0, 0.63, 100.3, 639.99, 640.0, 700.0, -3.0])
    tok = quantise(x, 640, 1000)
    assert tok.tolist() == [0, 0, 156, 999, 999, 999, 0]
    back = dequantise(tok, 640, 1000)
    assert back[2] == pytest.approx(156 * 0.64)
    inside = x[(x >= 0) & (x < 640)]
    rt = dequantise(quantise(inside, 640, 1000), 640, 1000)
    assert np.all(rt <= inside + 1e-9) and np.all(inside - rt < 0.64)


def test_box_and_polygon_targets_relative_to_pad_size():
    # x by pad_w, y by pad_h
    assert box_targets((64, 32, 320, 224), 640, 448, 1000) == [100, 71, 500, 500, 1000]
    toks = polygon_targets([(64, 44.9), (320, 224)], 640, 448, 1000, n=4)
    assert toks == [100, 100, 500, 500] + [1000] * 5 and len(toks) == 9
    with pytest.raises(ValueError):
        polygon_targets([(0, 0)] * 5, 640, 448, 1000, n=4)
    box = tokens_to_box([100, 100, 500, 500], 640, 448, 1000)
    assert box == pytest.approx((64, 44.8, 320, 224))


def test_sample_contour_every_ceil_nth():
    pts = [(i, i) for i in range(30)]
    assert sample_contour(pts, 12) == [(float(i), float(i)) for i in range(0, 30, 3)]  # ceil(30/12)=3 -> 10 pts
    assert len(sample_contour(pts[:12], 12)) == 12
    assert len(sample_contour(pts[:25], 12)) == 9  # step 3


def test_tokens_to_polygon_cuts_at_eos_and_odd_tail():
    nb = 100
    assert tokens_to_polygon([10, 20, 30, 40, 50, nb, 60, 70], 200, 100, nb) == [(20.0, 20.0), (60.0, 40.0)]
    assert tokens_to_polygon([nb, 1, 2], 200, 100, nb) == []
    assert len(tokens_to_polygon([1, 2, 3, 4, 5, 6], 200, 100, nb)) == 3


# --------------------------------------------------------------------------- raster


def test_polygon_to_mask_square_area():
    m = polygon_to_mask([(2, 2), (6, 2), (6, 6), (2, 6)], 10, 12)
    assert m.shape == (10, 12) and m.sum() == 16
    assert m[2:6, 2:6].all()
    big = polygon_to_mask([(10.0, 5.0), (110.0, 5.0), (110.0, 65.0), (10.0, 65.0)], 80, 120)
    assert big.sum() == 100 * 60
    circle = [(50 + 30 * math.cos(a), 40 + 30 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 100, endpoint=False)]
    assert abs(polygon_to_mask(circle, 100, 100).sum() / (math.pi * 900) - 1) < 0.02
    assert not polygon_to_mask([(1, 1), (8, 8)], 10, 10).any()  # 4 numbers: not a pycocotools box
    assert not polygon_to_mask([], 10, 10).any()
    assert polygon_to_mask([(-5, -5), (20, -5), (20, 20), (-5, 20)], 10, 10).all()


def test_rle_round_trip_and_layout():
    m = np.zeros((3, 4), bool)
    m[0, 0] = m[1, 0] = m[2, 3] = True
    rle = mask_to_rle(m)
    assert rle == {"size": [3, 4], "counts": [0, 2, 9, 1]}  # column-major, starts with zeros
    rng = np.random.default_rng(0)
    r = rng.random((37, 53)) > 0.6
    assert (rle_to_mask(mask_to_rle(r)) == r).all()
    z = np.zeros((5, 5), bool)
    assert mask_to_rle(z)["counts"] == [25] and not rle_to_mask(mask_to_rle(z)).any()


def test_ious():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[:, :2] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)


# ----------------------------------------------------------------------- preprocess


def test_prepare_sizes_and_padding():
    p = prepare(np.full((427, 640, 3), 200, np.uint8), 640, 32)
    assert p.img_shape == (427, 640) and p.pad_shape == (448, 640) and p.scale == (1.0, 1.0)
    assert p.pad_mask[427:].all() and not p.pad_mask[:427].any()
    assert float(p.tensor[:, :427].mean()) == pytest.approx(200.0)  # RGB 0-255, not normalised
    assert float(p.tensor[:, 427:].abs().sum()) == 0
    q = prepare(np.zeros((50, 100, 3), np.uint8), 640, 32)  # w=100, h=50 -> upscaled
    assert q.img_shape == (320, 640) and q.pad_shape == (320, 640) and q.scale == (6.4, 6.4)
    r = prepare(np.zeros((333, 500), np.uint8), 640, 32)  # grey; s = 1.28 -> h int(426.24+.5)
    assert r.img_shape == (426, 640) and r.tensor.shape == (3, 448, 640)
    rgba = np.zeros((20, 10, 4), np.uint8)
    rgba[..., 0] = 255
    s = prepare(rgba, 64, 32)
    assert s.img_shape == (64, 32) and float(s.tensor[0, :64, :32].mean()) == 255 and float(s.tensor[1].max()) == 0
    img, mask = collate([p, q])
    assert img.shape == (2, 3, 448, 640) and mask[1, 320:].all() and not mask[1, :320].any()


def test_prepare_rgb_order_kept():
    a = np.zeros((32, 32, 3), np.uint8)
    a[..., 0] = 10
    a[..., 2] = 250
    t = prepare(a, 32, 32).tensor
    assert float(t[0].mean()) == 10 and float(t[2].mean()) == 250


# ------------------------------------------------------------------------- decoding


def test_generate_det_four_tokens_without_eos():
    m = _diversify(_tiny("det"))
    with torch.no_grad():
        m.head.predictor[2].fc.bias[-1] += 100.0  # EOS would win everywhere if allowed
    img, mask, text = _batch(m)
    tok, score = m.generate(img, mask, text)
    assert tok.shape == (3, 4) and (tok < m.cfg.num_bin).all() and (tok >= 0).all()
    assert score.shape == (3,) and ((score > 0) & (score <= 1)).all()


def test_generate_segm_2n_plus_1_with_eos():
    m = _diversify(_tiny("segm", num_points=6))
    img, mask, text = _batch(m)
    tok, _ = m.generate(img, mask, text)
    assert tok.shape == (3, 13)
    with torch.no_grad():
        m.head.predictor[2].fc.bias[-1] += 100.0
    tok, score = m.generate(img, mask, text)
    assert (tok == m.cfg.num_bin).all()  # EOS is allowed in segm
    assert torch.allclose(score, torch.ones(3), atol=1e-4)  # only the first EOS counts


@pytest.mark.parametrize("task", ["det", "segm"])
def test_cached_decoding_matches_full_prefix(task):
    m = _diversify(_tiny(task, num_points=5), seed=3)
    img, mask, text = _batch(m, b=4)
    t1, s1 = m.generate(img, mask, text, use_cache=True)
    t2, s2 = m.generate(img, mask, text, use_cache=False)
    assert torch.equal(t1, t2)
    assert torch.allclose(s1, s2, atol=1e-5)
    assert len(set(t1.flatten().tolist())) > 4  # the check is not vacuous
    # and both agree with teacher forcing on the emitted tokens
    with torch.no_grad():
        logits = m(img, mask, text, torch.cat([t1, t1[:, :1]], 1)[:, :m.cfg.seq_len])
    if task == "det":
        logits = logits[:, :4, : m.cfg.num_bin]
    assert torch.equal(logits.argmax(-1)[:, : t1.shape[1]], t1)


def test_encode_once_memory_reuse():
    m = _diversify(_tiny("det"))
    img, mask, text = _batch(m)
    mem = m.encode(img, mask, text)
    assert mem.memory.shape == (3, 64, m.cfg.d_model) and mem.grid == (8, 8)
    assert mem.key_padding_mask[1].sum() == 8 * 2  # 32 px of padding at stride 16 = 2 columns
    t1, _ = m.generate(img, mask, text, memory=mem)
    t2, _ = m.generate(img, mask, text)
    assert torch.equal(t1, t2)


def test_forward_shape_and_padding_is_masked():
    m = _diversify(_tiny("segm", num_points=4))
    img, mask, text = _batch(m, b=2)
    tg = torch.randint(0, m.cfg.num_bin + 1, (2, m.cfg.seq_len))
    with torch.no_grad():
        out = m(img, mask, text, tg)
        assert out.shape == (2, 9, m.cfg.num_bin + 1) and torch.isfinite(out).all()
        # changing pixels under the padding mask changes features only through convs near the
        # border, never through attention to padded keys: a far-away padded region is ignored
        mem = m.encode(img, mask, text)
        assert mem.key_padding_mask[1].any() and not mem.key_padding_mask[0].any()


# ----------------------------------------------------------------------------- loss


def test_loss_formula():
    v, nb = 11, 10
    logits = torch.zeros(2, 5, v)
    tg = torch.tensor([[1, 2, 3, 4, nb], [5, 6, 7, 8, nb]])
    per = math.log(v) * (0.9 + 0.1 * (v - 1) / v)
    assert float(seqtr_loss(logits, tg, "det", nb)) == pytest.approx(per * (1.5 + 4) / 5, rel=1e-5)
    tg2 = torch.tensor([[1, 2, nb, nb, nb], [5, 6, 7, 8, nb]])
    assert float(seqtr_loss(logits, tg2, "segm", nb)) == pytest.approx(per * (2 + 0.3 + 4 + 0.1) / 10, rel=1e-5)
    # true token gets exactly 0.9: a confident correct prediction's loss matches the closed form
    conf = torch.full((1, 1, v), -5.0)
    conf[0, 0, 3] = 5.0
    lp = conf.log_softmax(-1)[0, 0]
    want = -(0.9 * lp[3] + 0.1 / v * (lp.sum() - lp[3]))
    assert float(seqtr_loss(conf, torch.tensor([[3]]), "segm", nb)) == pytest.approx(float(want), rel=1e-5)


def test_tiny_overfit_loss_decreases():
    torch.manual_seed(0)
    m = SeqTR(seqtr_tiny("det", vocab_size=20)).train()
    g = torch.Generator().manual_seed(0)
    img = torch.rand(4, 3, 128, 128, generator=g) * 255
    mask = torch.zeros(4, 128, 128, dtype=torch.bool)
    text = torch.randint(3, 20, (4, 8), generator=g)
    tg = torch.cat([torch.randint(0, 128, (4, 4), generator=g), torch.full((4, 1), 128)], 1)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = seqtr_loss(m(img, mask, text, tg), tg, "det", 128)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    m.eval()
    tok, _ = m.generate(img, mask, text)
    assert (tok == tg[:, :4]).float().mean() > 0.5  # it memorised most coordinates


# -------------------------------------------------------------------------- serving


def _grounder(task: str, **kw) -> SeqTRGrounder:
    m = _tiny(task, **kw)
    vocab = Vocabulary.from_words([f"w{i}" for i in range(17)])
    return SeqTRGrounder(m, vocab)


def test_polygon_back_to_original_pixels_not_distorted():
    g = _grounder("segm", num_points=4, long_side=640, size_divisor=32, num_bin=1000)
    h, w = 427, 640  # padded to 448: resizing the padded mask would stretch y by 448/427
    item = g.prepare(np.zeros((h, w, 3), np.uint8), "w1")
    assert item.prepared.pad_shape == (448, 640)
    sq = [(100, 100), (300, 100), (300, 400), (100, 400)]
    toks = [t for x, y in sq for t in (math.floor(x / 640 * 1000), math.floor(y / 448 * 1000))] + [1000]
    gr = g.postprocess(item, toks, 0.5)
    assert gr.mask.shape == (h, w)
    want = polygon_to_mask(sq, h, w)
    assert mask_iou(gr.mask, want) > 0.98
    # the official resize-the-padded-mask result would be off by ~5 % in y
    ys = np.flatnonzero(gr.mask.any(1))
    assert abs(ys[-1] - 399) <= 1 and abs(ys[0] - 100) <= 1
    assert gr.box == pytest.approx((99.84, 99.68, 299.52, 399.6), abs=0.5)
    # downscaled image: vertices divided by the scale factor
    big = g.prepare(np.zeros((1000, 700, 3), np.uint8), "w1")  # s = 0.64 -> 640 x 448
    assert big.prepared.img_shape == (640, 448) and big.prepared.pad_shape == (640, 448)
    gr2 = g.postprocess(big, [500, 500, 750, 500, 750, 750, 1000, 0, 0], 0.5)
    assert gr2.mask.shape == (1000, 700)
    assert gr2.polygon[0] == pytest.approx((448 * 0.5 / 0.64, 640 * 0.5 / 0.64))
    assert rescale_polygon([(64.0, 32.0)], (0.64, 0.32)) == [(100.0, 100.0)]


def test_det_box_original_pixels_ordered_and_clipped():
    g = _grounder("det")
    item = g.prepare(np.zeros((50, 100, 3), np.uint8), "w1 zebra")
    assert item.unknown_words == ["zebra"]
    p = item.prepared
    assert p.img_shape == (64, 128) and p.pad_shape == (64, 128)
    gr = g.postprocess(item, [64, 32, 0, 127], 0.9)  # x2 < x1: reordered
    assert gr.box == pytest.approx((0.0, 12.5, 50.0, 49.609375))
    assert gr.mask is None and gr.polygon is None


def test_run_batches_mixed_sizes_and_draw():
    for task in ("det", "segm"):
        g = _grounder(task, num_points=5)
        _diversify(g.model)
        imgs = [np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
                for i, (h, w) in enumerate([(90, 128), (128, 60), (37, 51)])]
        items = [g.prepare(im, e) for im, e in zip(imgs, ["w1 w2", "w3", "w4 w5 w6"])]
        assert isinstance(items[0], GroundingItem)
        out = g.run(items)
        assert len(out) == 3
        for im, gr in zip(imgs, out):
            h, w = im.shape[:2]
            x1, y1, x2, y2 = gr.box
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
            assert 0 < gr.score <= 1
            if task == "segm":
                assert gr.mask.shape == (h, w)
            assert g.draw(im, gr).size == (w, h)
        # same-size batch mates do not change an answer; grouping by shape gives the batch-1 answer
        single = g.run([items[1]])[0]
        mate = g.prepare(np.random.default_rng(9).integers(0, 255, (128, 62, 3), dtype=np.uint8), "w2")
        assert mate.prepared.pad_shape == items[1].prepared.pad_shape
        assert g.run([items[1], mate])[0].tokens == single.tokens
        grouped = g.run(items, group_by_shape=True)
        assert [x.tokens for x in grouped] == [x.tokens for x in (g.run([it])[0] for it in items)]


# ----------------------------------------------------------------------------- cost


def test_flops_match_the_official_count():
    """The analytic FLOPs per component against a torch.utils.flop_counter count of a replica
    of the official module tree (640x640 det and segm, and 480x640 det)."""
    f = seqtr_flops(SEQTR_DET(1000), 640, 640)
    assert f["vis_enc"] / 1e9 == pytest.approx(128.6, abs=0.1)
    assert f["fusion"] / 1e9 == pytest.approx(30.7, abs=0.1)
    assert f["encoder"] / 1e9 == pytest.approx(5.0, abs=0.05)
    assert f["lan_enc"] / 1e9 == pytest.approx(0.07, abs=0.01)
    assert (f["total"] - f["decoder"] + f["decoder_uncached"]) / 1e9 == pytest.approx(166, abs=1.0)
    s = seqtr_flops(SEQTR_SEGM(1000, 18), 640, 640)
    assert (s["total"] - s["decoder"] + s["decoder_uncached"]) / 1e9 == pytest.approx(181, abs=1.5)
    assert seqtr_flops(SEQTR_DET(1000), 480, 640)["total"] / 1e9 == pytest.approx(124, abs=1.5)


@pytest.mark.parametrize("strides", [(2, 2, 2, 1, 2, 1), (2, 2, 2, 1, 1, 1)], ids=["stride16", "stride8"])
def test_flops_agree_with_flop_counter_on_tiny(strides):
    from torch.utils.flop_counter import FlopCounterMode
    m = _tiny("det", dark_strides=strides)
    assert m.cfg.stride == math.prod(strides)
    img, mask, text = _batch(m, b=1, size=(96, 128))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m.encode(img, mask, text)
    f = m.flops(96, 128)
    # The counter sees the GRU but not the attention matmuls inside nn.MultiheadAttention's
    # fused scaled_dot_product_attention (4 * S^2 * d FLOPs per encoder layer); everything
    # else must agree exactly.
    cells = (96 // m.cfg.stride) * (128 // m.cfg.stride)
    attention = 4.0 * cells * cells * m.cfg.d_model * m.cfg.enc_layers
    expected = f["vis_enc"] + f["lan_enc"] + f["fusion"] + f["encoder"] - attention
    assert fc.get_total_flops() == pytest.approx(expected, rel=1e-6)
