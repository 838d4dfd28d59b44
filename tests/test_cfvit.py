"""CF-ViT: official checkpoint compatibility (state dicts synthesised from the official
layout written out by hand, not from our module), the cost model against the MACs stored in
the official checkpoints, a count of the official code and torch's flop counter, the
early-exit semantics, pre-processing, serving and training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.cfvit import model as cfm
from models.cfvit.checkpoint import config_from_official_state, load_official, official_curve, save_ours
from models.cfvit.model import children_indices, count_macs, create_model
from models.cfvit.preprocess import eval_transform, load_class_names
from models.cfvit.serving import CfVitModel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on a shared 2-core machine two threads make these forwards several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ---- the official layout (key names and shapes of the released checkpoints), by hand ------


def official_layout(family: str, grid: int) -> dict[str, tuple[int, ...]]:
    d, c = 384, 1000
    nc, nf = grid * grid + 1, (2 * grid) ** 2 + 1
    lay: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d), "pos_embed_list.0": (1, nc, d),
                                       "pos_embed_list.1": (1, nf, d)}
    if family == "deit":
        depth, hidden, qkv_bias = 12, 1536, True
        lay["patch_embed.proj.weight"], lay["patch_embed.proj.bias"] = (d, 3, 16, 16), (d,)
    else:
        depth, hidden, qkv_bias = 16, 1152, False
        lay["patch_embed.conv1.weight"] = (64, 3, 7, 7)
        lay["patch_embed.conv2.weight"] = (64, 64, 3, 3)
        lay["patch_embed.conv3.weight"] = (64, 64, 3, 3)
        for bn in ("bn1", "bn2", "bn3"):
            for t in ("weight", "bias", "running_mean", "running_var"):
                lay[f"patch_embed.{bn}.{t}"] = (64,)
            lay[f"patch_embed.{bn}.num_batches_tracked"] = ()
        lay["patch_embed.proj.weight"], lay["patch_embed.proj.bias"] = (d, 64, 8, 8), (d,)
    for n in range(depth):
        b = f"blocks.{n}."
        lay[b + "norm1.weight"] = lay[b + "norm1.bias"] = (d,)
        lay[b + "attn.qkv.weight"] = (3 * d, d)
        if qkv_bias:
            lay[b + "attn.qkv.bias"] = (3 * d,)
        lay[b + "attn.proj.weight"], lay[b + "attn.proj.bias"] = (d, d), (d,)
        lay[b + "norm2.weight"] = lay[b + "norm2.bias"] = (d,)
        lay[b + "mlp.fc1.weight"], lay[b + "mlp.fc1.bias"] = (hidden, d), (hidden,)
        lay[b + "mlp.fc2.weight"], lay[b + "mlp.fc2.bias"] = (d, hidden), (d,)
    lay["norm.weight"] = lay["norm.bias"] = (d,)
    lay["head.weight"], lay["head.bias"] = (c, d), (c,)
    if family == "lvvit":
        lay["aux_head.weight"], lay["aux_head.bias"] = (c, d), (c,)
    lay["reuse_block.0.weight"] = lay["reuse_block.0.bias"] = (d,)
    lay["reuse_block.1.fc1.weight"], lay["reuse_block.1.fc1.bias"] = (hidden, d), (hidden,)
    lay["reuse_block.1.fc2.weight"], lay["reuse_block.1.fc2.bias"] = (d, hidden), (d,)
    return lay


def synthesise(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(100, dtype=torch.int64)
        elif k.endswith("running_var") or (len(shape) == 1 and k.endswith("weight") and ("norm" in k or "bn" in k
                                                                                          or "reuse_block.0" in k)):
            sd[k] = 1.0 + 0.1 * torch.rand(shape, generator=g)
        else:
            sd[k] = 0.02 * torch.randn(shape, generator=g)
    return sd


def n_params(layout: dict[str, tuple[int, ...]]) -> int:
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(s) for k, s in layout.items() if not k.endswith(skip))


@pytest.mark.parametrize("family,grid,tensors,params", [
    ("deit", 7, 159, 23_252_200), ("deit", 9, 159, 23_313_640),
    ("lvvit", 7, 211, 27_058_064), ("lvvit", 9, 211, 27_119_504)])
def test_layout_totals_match_the_official_model(family, grid, tensors, params):
    """The official state-dict layout (written out by hand) has the official tensor and
    parameter counts, and our model has exactly that layout: same names and shapes."""
    lay = official_layout(family, grid)
    assert len(lay) == tensors and n_params(lay) == params
    m = create_model(f"cf_{family}_small_{grid}")
    assert sum(p.numel() for p in m.parameters()) == params
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert ours == lay  # same names and shapes, nothing missing, nothing unexpected


@pytest.mark.parametrize("family,grid", [("deit", 7), ("lvvit", 7), ("deit", 9)])
def test_official_checkpoint_loads_and_runs(tmp_path, family, grid):
    sd = synthesise(official_layout(family, grid))
    curve_flops = [1.1 + 0.029 * i for i in range(100)]
    ckpt = {"model": {f"module.{k}": v for k, v in sd.items()} if family == "lvvit" else sd,
            "flop": [1.10, 4.00], "anytime_classification": [75.48, 80.78],
            "budgeted_batch_classification": [curve_flops, [75.0 + 0.05 * i for i in range(100)]]}
    path = tmp_path / f"cf_{family}_{grid}.pth"
    torch.save(ckpt, path)
    ck = load_official(path)  # strict: raises on any missing / unexpected key
    assert ck.config.name == f"cf_{family}_small_{grid}" and ck.source == "official"
    assert ck.config.qkv_bias == (family == "deit") and ck.config.ln_eps == (1e-6 if family == "deit" else 1e-5)
    assert ck.meta["flop"] == [1.10, 4.00]
    got = ck.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    s = ck.config.img_size
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = ck.model.forward_exit(x, torch.tensor([0.0, 1.01]))  # row 0 exits, row 1 runs the fine stage
    assert out.logits.shape == (2, 1000) and torch.isfinite(out.logits).all()
    assert out.exited.tolist() == [True, False]
    curve = official_curve(ck.meta, ck.config)
    assert len(curve) == 101 and curve[0]["exit_rate"] == pytest.approx(1.0) and curve[-1]["eta"] == 1.01
    assert 0.0 <= min(p["exit_rate"] for p in curve)


def test_official_nine_by_nine_deit_uses_its_own_fine_grid():
    """The official DeiT forward_early_exit hard-codes 14x14 / 224 and crashes for 9x9."""
    torch.manual_seed(0)
    m = create_model("cf_deit_small_9", depth=4).eval()
    assert (m.cfg.coarse_grid, m.cfg.fine_grid, m.cfg.fine_seq_len) == (9, 18, 205)
    seen = []
    h = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    with torch.inference_mode():
        c, f = m.forward_all(torch.randn(1, 3, 288, 288))
        out = m.forward_exit(torch.randn(1, 3, 288, 288), 1.01)
    h.remove()
    assert seen == [82, 205, 82, 205] and out.logits.shape == (1, 1000)


def test_config_detection_rejects_other_dicts():
    with pytest.raises(ValueError):
        config_from_official_state({"weight": torch.zeros(1)})


# ---- cost model -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,coarse,full,rel", [
    ("cf_deit_small_7", 1.10, 4.00, 0.01),   # the checkpoint's `flop` / the authors' notebook
    ("cf_deit_small_7", 1.100, 4.014, 0.001),  # torch flop counter on the official code
    ("cf_lvvit_small_7", 1.574, 6.177, 0.01),
    ("cf_lvvit_small_7", 1.567, 6.151, 0.001),
    ("cf_deit_small_9", 1.831, 6.759, 0.01),
    ("cf_lvvit_small_9", 2.607, 10.344, 0.001)])
def test_macs_reproduce_the_official_counts(name, coarse, full, rel):
    """Coarse and full GMACs of our cost model against the official numbers: the MACs stored
    in the checkpoints / the authors' notebook (1 %) and torch's flop counter run on the
    official code (0.1 %)."""
    m = count_macs(cfm.CONFIGS[name])
    assert m.coarse / 1e9 == pytest.approx(coarse, rel=rel)
    assert m.full / 1e9 == pytest.approx(full, rel=rel)


def test_fine_increment_and_expected_cost():
    m = count_macs(cfm.CONFIGS["cf_deit_small_7"])
    assert m.fine_increment / 1e9 == pytest.approx(2.90, rel=0.01)
    assert count_macs(cfm.CONFIGS["cf_lvvit_small_7"]).fine_increment / 1e9 == pytest.approx(4.60, rel=0.01)
    assert m.expected(1.0) == m.coarse and m.expected(0.0) == m.full
    assert m.expected(0.5) == pytest.approx(m.coarse + 0.5 * m.fine_increment)


def _explicit_sdpa(q, k, v):
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


@pytest.mark.parametrize("overrides", [{"stem": "patch"}, {"stem": "conv4", "patch_size": 8, "img_size": 64, "aux_head": True,
                                            "qkv_bias": False}])
def test_macs_match_torch_flop_counter(monkeypatch, overrides):
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(cfm, "_sdpa", _explicit_sdpa)  # so that the counter sees the attention matmuls
    m = create_model("cf_tiny_glyphs", **overrides).eval()
    s = m.cfg.img_size
    x = torch.randn(1, 3, s, s)
    counts = []
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            c = m.coarse_stage(x)
        counts.append(fc.get_total_flops() // 2)
        for sel in (True, False):
            with FlopCounterMode(display=False) as fc:
                m.fine_stage(x, c, informative_selection=sel)
            counts.append(fc.get_total_flops() // 2)
    macs = count_macs(m.cfg)
    assert counts == [macs.coarse, macs.fine_increment, macs.fine_increment_no_selection]


# ---- the forward pass -----------------------------------------------------------------------


def test_children_indices_match_brute_force():
    gc = 5
    gf = 2 * gc
    sel = torch.tensor([[0, 7, 24, 12, 3]])
    k = sel.shape[1]
    kids = children_indices(sel, gc)[0].tolist()
    assert len(kids) == 4 * k
    for j, i in enumerate(sel[0].tolist()):
        expect = sorted(f for f in range(gf * gf) if (f // gf) // 2 == i // gc and (f % gf) // 2 == i % gc)
        assert sorted(kids[j + q * k] for q in range(4)) == expect


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("cf_tiny_glyphs", num_classes=10).eval()


def test_exit_semantics_match_forward_all(tiny):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 32, 32, generator=g)
    with torch.inference_mode():
        coarse, fine = tiny.forward_all(x)
        conf = coarse.softmax(-1).max(-1).values
        all_coarse = tiny.forward_exit(x, 0.0)
        all_fine = tiny.forward_exit(x, 1.01)
        eta = torch.where(torch.arange(6) % 2 == 0, torch.tensor(0.0), torch.tensor(1.01))
        mixed = tiny.forward_exit(x, eta)
        one = tiny.forward_exit(x[:1], torch.tensor([1.01]))  # a batch of one is never squeezed
        mid = tiny.forward_exit(x, float(conf.median()))
    assert all_coarse.exited.all() and torch.allclose(all_coarse.logits, coarse)
    assert not all_fine.exited.any() and torch.allclose(all_fine.logits, fine, atol=1e-5)
    assert torch.allclose(all_coarse.confidence, conf)
    assert mixed.exited.tolist() == [True, False] * 3
    assert torch.allclose(mixed.logits[0::2], coarse[0::2]) and torch.allclose(mixed.logits[1::2], fine[1::2], atol=1e-5)
    assert one.logits.shape == (1, 10) and torch.allclose(one.logits, fine[:1], atol=1e-5)
    assert torch.equal(mid.exited, conf >= conf.median())


def test_token_counts_and_sequence_contents(tiny):
    cfg = tiny.cfg
    assert (cfg.coarse_grid, cfg.fine_grid, cfg.num_selected, cfg.fine_seq_len) == (4, 8, 8, 41)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        c = tiny.coarse_stage(x)
        seq = tiny.fine_sequence(x, c)
        full = tiny.fine_sequence(x, c, informative_selection=False)
        ef = tiny._embed(x, tiny.pos_embed_list[1], tiny.reuse_features(c.features))
    assert seq.shape == (2, 41, cfg.embed_dim) and full.shape == (2, 65, cfg.embed_dim)
    assert torch.equal(full, ef)
    order = c.score.argsort(dim=1, descending=True, stable=True)
    for b in range(2):
        sel, rest = order[b, :8], order[b, 8:]
        kids = children_indices(sel[None], 4)[0]
        assert torch.equal(seq[b, 0], ef[b, 0])
        assert torch.equal(seq[b, 1:33], ef[b, 1 + kids])  # fine children carry the reuse term
        assert torch.equal(seq[b, 33:], c.embeddings[b, 1 + rest])  # coarse *input* embeddings


def test_global_attention_is_the_ema_of_cls_rows(tiny):
    x = torch.randn(1, 3, 32, 32)
    rows = []
    hooks = [blk.attn.register_forward_hook(lambda mod, a, out: rows.append(out[1])) for blk in tiny.blocks]
    with torch.inference_mode():
        c = tiny.coarse_stage(x)
    for h in hooks:
        h.remove()
    a = torch.zeros_like(c.score)
    for i, r in enumerate(rows):
        assert (r is None) == (i < tiny.cfg.global_attn_start)
        if r is not None:
            a = 0.99 * a + 0.01 * r
    assert torch.allclose(a, c.score)


def test_reuse_upsampling_is_nearest(tiny):
    z = torch.randn(1, 17, tiny.cfg.embed_dim)
    with torch.inference_mode():
        r = tiny.reuse_features(z)
        direct = tiny.reuse_block(z[:, 1:])
    grid = r.reshape(1, 8, 8, -1)
    for f in range(64):
        rr, cc = divmod(f, 8)
        assert torch.allclose(grid[0, rr, cc], direct[0, (rr // 2) * 4 + cc // 2])


def test_lvvit_logit_forms():
    torch.manual_seed(0)
    m = create_model("cf_tiny_glyphs", num_classes=7, stem="conv4", stem_channels=64, patch_size=8, img_size=64, aux_head=True,
                     skip_lam=2.0, qkv_bias=False).eval()
    z = torch.randn(3, 5, m.cfg.embed_dim)
    with torch.inference_mode():
        base = m.head(z[:, 0]) + 0.25 * m.aux_head(z[:, 1:]).max(1).values
        assert torch.allclose(m._logits(z, coarse=True), base / 1.25)
        assert torch.allclose(m._logits(z, coarse=False), base)
        assert m.forward_exit(torch.randn(2, 3, 64, 64), 0.5).logits.shape == (2, 7)


# ---- pre-processing -------------------------------------------------------------------------


def test_eval_transform_matches_the_torchvision_recipe():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
    x = eval_transform(img, 224, 0.875, cfm.IMAGENET_MEAN, cfm.IMAGENET_STD)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # Resize(256): short side 375 -> 256, long side int(256 * 500 / 375) = 341; CenterCrop(224)
    r = np.asarray(Image.fromarray(img).resize((341, 256), Image.BICUBIC))
    top, left = int(round((256 - 224) / 2)), int(round((341 - 224) / 2))
    crop = r[top:top + 224, left:left + 224].astype(np.float32) / 255
    ref = (crop - np.array(cfm.IMAGENET_MEAN)) / np.array(cfm.IMAGENET_STD)
    assert np.allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    # LV-ViT: crop_pct 0.9 -> int(224 / 0.9) = 248
    assert eval_transform(img, 224, 0.9, cfm.IMAGENET_MEAN, cfm.IMAGENET_STD).shape == (3, 224, 224)
    assert eval_transform(img[..., 0], 32, 1.0, (0.5,) * 3, (0.5,) * 3).shape == (3, 32, 32)


def test_coarse_input_is_align_corners_bilinear(tiny):
    x = torch.randn(1, 3, 32, 32)
    c = tiny.coarse_input(x)
    assert c.shape == (1, 3, 16, 16)
    assert torch.allclose(c[..., 0, 0], x[..., 0, 0]) and torch.allclose(c[..., -1, -1], x[..., -1, -1])


def test_class_names(tmp_path):
    assert load_class_names(None, 3) == ["class_0", "class_1", "class_2"]
    (tmp_path / "n.txt").write_text("cat\ndog\n\nfox\n")
    assert load_class_names(tmp_path / "n.txt", 3) == ["cat", "dog", "fox"]
    (tmp_path / "n.json").write_text(json.dumps({"0": ["n1", "tench"], "1": ["n2", "goldfish"]}))
    assert load_class_names(tmp_path / "n.json", 2) == ["tench", "goldfish"]
    with pytest.raises(ValueError):
        load_class_names(tmp_path / "n.txt", 4)


# ---- serving --------------------------------------------------------------------------------


def _tiny_served(tmp_path, tiny) -> CfVitModel:
    m = count_macs(tiny.cfg)
    curve = []
    for i, eta in enumerate([0.0, 0.25, 0.5, 0.75, 1.0, 1.01]):
        p = max(0.0, 1.0 - 0.25 * i)
        curve.append({"eta": eta, "exit_rate": p, "expected_flops": m.expected(p), "accuracy": 0.5 + 0.05 * i})
    save_ours(tiny, tmp_path / "w", {"name": "tiny-test", "classes": [f"c{i}" for i in range(10)],
                                     "evaluation": {"val": {"eta_curve": curve}}})
    return CfVitModel.from_checkpoint(tmp_path / "w" / "model.safetensors")


def test_serving_interface(tmp_path, tiny):
    sm = _tiny_served(tmp_path, tiny)
    assert sm.name == "tiny-test" and sm.classes[3] == "c3"
    assert sm.flops_full == count_macs(tiny.cfg).full and sm.flops_coarse < sm.flops_full
    img = np.random.default_rng(0).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    x = torch.stack([sm.preprocess(img)] * 3)
    assert x.shape == (3, 3, 32, 32)
    logits, exited, conf = sm.forward(x, torch.tensor([0.0, 1.01, 1.01]))
    assert logits.shape == (3, 10) and exited.tolist() == [True, False, False] and conf.shape == (3,)
    assert sm.flops_for(exited).tolist() == [sm.flops_coarse, sm.flops_full, sm.flops_full]
    with torch.inference_mode():
        ref = tiny.forward_exit(x, torch.tensor([0.0, 1.01, 1.01])).logits
    assert torch.allclose(logits, ref, atol=1e-5)
    fractions = np.linspace(0, 1.2, 61)
    etas = [sm.eta_for_budget(f) for f in fractions]
    assert etas == sorted(etas) and etas[0] == 0.0 and sm.eta_for_budget(1.0) == 1.01
    for f, e in zip(fractions, etas):
        assert sm.expected_flops(e) <= max(f * sm.flops_full, sm.flops_coarse) * (1 + 1e-9)


BUNDLED = REPO / "models" / "cfvit" / "weights" / "cf-tiny-glyphs" / "model.safetensors"


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled CF-ViT demo weights not built")
def test_bundled_demo_model_and_manifest():
    sm = CfVitModel.from_checkpoint(BUNDLED)
    man = json.loads(BUNDLED.with_name("manifest.json").read_text())
    assert sm.flops_coarse == man["flops"]["coarse"] and sm.flops_full == man["flops"]["full"]
    assert len(sm.classes) == sm.config.num_classes and sm.curve
    assert [p["eta"] for p in sm.curve] == sorted(p["eta"] for p in sm.curve)
    ev = man["evaluation"]
    assert ev["val"]["accuracy_all_fine"] > ev["val"]["accuracy_coarse_only"]
    exits = [p["exit_rate"] for p in sm.curve]
    assert exits == sorted(exits, reverse=True) and exits[0] == 1.0 and exits[-1] == 0.0


# ---- training -------------------------------------------------------------------------------


def test_training_runs_and_resumes(tmp_path, monkeypatch):
    from models.cfvit import data, train

    small = {"train": 256, "val": 64, "test": 64}
    monkeypatch.setattr(data, "load", lambda name, split: data.synthetic_shapes(small[split], seed=len(split)))

    out = tmp_path / "run"
    args = ["--data", "shapes", "--steps", "6", "--batch", "16", "--selection-from", "0.5", "--out", str(out),
            "--eval-every", "0", "--save-every", "3", "--embed-dim", "32", "--depth", "2", "--heads", "2",
            "--limit-eval", "64", "--name", "t", "--pause-file", "", "--weights-dir", str(tmp_path / "weights")]
    train.main(args + ["--stop-after", "3"])
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 3
    train.main(args)
    man = json.loads((tmp_path / "weights" / "t" / "manifest.json").read_text())
    assert man["training"]["steps"] == 6 and man["training"]["resumed_from"] == [3]
    assert {"coarse", "fine_increment", "full"} <= set(man["flops"])
    assert len(man["evaluation"]["val"]["eta_curve"]) == 22
    sm = CfVitModel.from_checkpoint(tmp_path / "weights" / "t" / "model.safetensors")
    assert sm.curve == man["evaluation"]["val"]["eta_curve"]


@pytest.mark.slow  # renders and classifies the 5,000-image test split
@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled CF-ViT demo weights not built")
def test_bundled_demo_trades_flops_for_accuracy_on_held_out_fonts():
    """Re-measures the demo's claim on the held-out test fonts: coarse-only is clearly worse
    than all-fine, and the eta the manifest names saves >= 35 % of the all-fine MACs within
    0.5 points of all-fine accuracy."""
    from models.cfvit import data
    from models.cfvit.evaluate import best_saving

    man = json.loads(BUNDLED.with_name("manifest.json").read_text())
    try:
        test = data.load("glyphs", "test")
    except Exception as e:  # the glyph images are rendered locally (make data), never committed
        pytest.skip(f"glyph test split unavailable: {e}")
    if test.source.get("font_index_key") != man["data"]["test"]["source"].get("font_index_key"):
        pytest.skip("the glyph data changed since training")
    sm = CfVitModel.from_checkpoint(BUNDLED)
    x = data.to_tensor(test.images, sm.config.mean, sm.config.std)
    y = torch.from_numpy(test.labels)
    point = best_saving(man["evaluation"]["test"]["eta_curve"], man["evaluation"]["test"]["accuracy_all_fine"])

    def run(eta: float) -> tuple[float, float]:
        right, spent = 0, 0.0
        for i in range(0, len(x), 500):
            logits, exited, _ = sm.forward(x[i:i + 500], torch.full((len(x[i:i + 500]),), eta))
            right += int((logits.argmax(-1) == y[i:i + 500]).sum())
            spent += float(sm.flops_for(exited).sum())
        return right / len(x), spent / (len(x) * sm.flops_full)

    coarse, _ = run(0.0)
    fine, _ = run(1.01)
    acc, frac = run(point["eta"])
    assert fine - coarse > 0.05
    assert frac <= 0.65 and fine - acc <= 0.005
    assert acc == pytest.approx(point["accuracy"], abs=0.002)


def test_official_checkpoint_gets_int8_built_at_start_up_with_an_estimate(tmp_path):
    """An official checkpoint has no measured int8 version: the server builds dynamic int8
    linears at start-up and lists each stage's accuracy drop as estimated (top-1
    disagreement with fp32 on synthetic images), its int8 eta curve lowered by that much."""
    from compress.int8 import is_quantized
    from service.families.cfvit import CfVitFamily

    sd = synthesise(official_layout("deit", 7))
    ckpt = {"model": sd, "flop": [1.10, 4.00], "anytime_classification": [75.48, 80.78],
            "budgeted_batch_classification": [[1.1 + 0.029 * i for i in range(100)], [75.0 + 0.05 * i for i in range(100)]]}
    path = tmp_path / "cf_deit_7.pth"
    torch.save(ckpt, path)
    model = CfVitModel.from_checkpoint(path)
    assert model.int8_net is not None and is_quantized(model.int8_net) and model.int8_meta["estimated"]
    drops = {r["rung"]: r["quality"]["accuracy_drop_estimate"] for r in model.int8_meta["rungs"]}
    assert set(drops) == {"coarse", "fine"} and all(0.0 <= d <= 1.0 for d in drops.values())
    worst = max(drops.values())
    fp32 = {p["eta"]: p["accuracy"] for p in model._budget_curve}
    assert all(p["accuracy"] == pytest.approx(max(0.0, fp32[p["eta"]] - worst)) for p in model.int8_meta["eta_curve"])
    listed = {r.name: r.detail for r in CfVitFamily(model).rungs()}
    assert listed["fine-int8"]["accuracy_drop_estimate"] == drops["fine"] and "estimate" in listed["fine-int8"]
    assert CfVitModel.from_checkpoint(path, int8=False).int8_net is None


def test_int8_estimate_is_at_least_the_measured_drop():
    """The start-up estimate (disagreement on synthetic images, no data set) against the drop
    measured on labelled held-out glyphs, for the bundled model's dynamic int8 linears: the
    estimate does not promise less than is lost, and it is not vacuous either."""
    from models.cfvit import data
    from models.cfvit.quantize import disagreement, int8_network, probe_images
    from service.bundled import bundled

    path = bundled("cfvit")
    if path is None:
        pytest.skip("no bundled CF-ViT")
    try:
        test = data.load("glyphs", "test")
    except Exception as e:  # the glyph images are rendered locally (make data), never committed
        pytest.skip(f"glyph test split unavailable: {e}")
    model = CfVitModel.from_checkpoint(path, int8=False)
    int8 = int8_network(model.net, None)
    estimate = disagreement(model.net, int8, probe_images(model.preprocess))
    x = data.to_tensor(test.images[:1000], model.config.mean, model.config.std)
    y = torch.from_numpy(test.labels[:1000])
    with torch.inference_mode():
        measured = [float((a.argmax(1) == y).float().mean() - (b.argmax(1) == y).float().mean())
                    for a, b in zip(model.net.forward_all(x), int8.forward_all(x))]
    for stage, drop in zip(("coarse", "fine"), measured):
        assert drop <= estimate[stage] + 0.005, (stage, drop, estimate)
        assert estimate[stage] <= 0.2, (stage, estimate)


def _bundled_cfvit() -> Path:
    from service.bundled import bundled

    path = bundled("cfvit")
    if path is None or not (path.parent / "bf16.json").exists():
        pytest.skip("the bundled CF-ViT or its bf16.json is missing")
    return path


@pytest.mark.slow  # measures 7,500 images twice
def test_bf16_version_reproduces_its_measured_quality_within_half_a_point_of_fp32(tmp_path):
    """``bf16.json`` is what ``python -m models.cfvit.bf16`` measured on the held-out fonts:
    the network in bf16, each stage within 0.5 points of float32.  The command, run again here
    on a copy of the bundle, writes a manifest with the same numbers (to a few images: bf16
    rounding may differ between kernels) and the val curve the planner uses."""
    import shutil

    from compress.bf16 import native_bf16
    from models.cfvit.bf16 import BF16_MANIFEST, load_bf16, main

    path = _bundled_cfvit()
    meta = load_bf16(path)
    by_stage = {r["rung"]: r for r in meta["rungs"]}
    assert set(by_stage) == {"coarse", "fine"}
    for entry in by_stage.values():
        q = entry["quality"]
        assert abs(q["test_accuracy"] - q["test_accuracy_fp32"]) <= 0.005, entry
        assert entry["method"] == "bf16-autocast" and entry["command"].startswith("python -m models.cfvit.bf16")
    if not native_bf16("cpu"):
        pytest.skip("this CPU emulates bf16: measuring 7,500 images again would take minutes")
    for name in ("model.safetensors", "manifest.json"):
        shutil.copy(path.parent / name, tmp_path / name)
    main([str(tmp_path), "--threads", "2"])
    again = json.loads((tmp_path / BF16_MANIFEST).read_text())
    for entry in again["rungs"]:
        for key in ("test_accuracy", "val_accuracy"):
            assert entry["quality"][key] == pytest.approx(by_stage[entry["rung"]]["quality"][key], abs=0.002)
    assert [p["eta"] for p in again["eta_curve_dense"]] == [p["eta"] for p in meta["eta_curve_dense"]]


@pytest.mark.parametrize("native", [True, False])
def test_bf16_rungs_are_listed_and_served_only_where_bf16_is_native(monkeypatch, native):
    """Where the CPU multiplies bf16 natively the family lists coarse-bf16 and fine-bf16 with
    their measured quality and serves them (the float network under bf16 autocast, the same
    top-1 as float32 on nearly every image); elsewhere bf16 is emulated and slower, and the
    rungs do not exist (a request for one is a 422 naming those that do)."""
    import io

    import compress.bf16
    from fastapi.testclient import TestClient

    from models.cfvit.data import synthetic_shapes, to_tensor
    from service.app import create_app
    from service.config import Settings
    from service.families.cfvit import CfVitFamily
    from tests.conftest import FAST_START, synthetic_photo, wait_ready

    path = _bundled_cfvit()
    if native and not compress.bf16.native_bf16("cpu"):
        pytest.skip("this CPU does not multiply bf16 natively")
    monkeypatch.setattr(compress.bf16, "native_bf16", lambda device="cpu": native)
    model = CfVitModel.from_checkpoint(path, int8=False)
    assert (model.bf16_meta is not None) is native
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(32, 32)).save(buf, format="PNG")
    with TestClient(create_app(Settings(**FAST_START), families=[CfVitFamily(model)])) as c:
        wait_ready(c, timeout=120)
        rungs = {r["name"]: r for r in c.get("/v1/models").json()["models"][0]["rungs"]}
        r = c.post("/classify", content=buf.getvalue(), headers={"content-type": "image/png"},
                   params={"rung": "fine-bf16"})
        if not native:
            assert not any(n.endswith("-bf16") for n in rungs)
            assert r.status_code == 422 and "fine-bf16" not in r.json()["error"]["accepted"], r.text
            return
        assert r.status_code == 200, r.text
        assert r.json()["rung"]["precision"] == "bf16" and r.json()["rung"]["name"] == "fine-bf16"
    for stage in ("coarse", "fine"):
        listed = rungs[f"{stage}-bf16"]
        entry = next(e for e in model.bf16_meta["rungs"] if e["rung"] == stage)
        assert listed["precision"] == "bf16" and listed["ms_per_item_full_batch"] > 0
        assert listed["test_accuracy"] == entry["quality"]["test_accuracy"] and listed["command"] == entry["command"]
    x = to_tensor(synthetic_shapes(64, seed=5, size=model.input_size).images, model.config.mean, model.config.std)
    fine = torch.full((64,), 1.01)
    fp32, bf16 = model.forward(x, fine)[0], model.forward(x, fine, bf16=True)[0]
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)  # really computed in bf16
    assert (fp32.argmax(1) == bf16.argmax(1)).float().mean() >= 0.95


def test_every_plan_of_the_served_ladder_is_predicted_to_cost_time():
    """The planner's time for each (eta, precision) it may choose is that plan's share of a
    pass, never nothing (fractional work units were once truncated to 0: every plan but
    all-fine was free, and a request under load was admitted at budget 1 and answered late)."""
    import io

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings
    from service.families.cfvit import CfVitFamily
    from tests.conftest import FAST_START, synthetic_photo, wait_ready

    model = CfVitModel.from_checkpoint(_bundled_cfvit(), int8=False, bf16=False)
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(32, 32)).save(buf, format="PNG")
    with TestClient(create_app(Settings(**FAST_START), families=[CfVitFamily(model)])) as c:
        wait_ready(c, timeout=120)
        svc = c.app.state.services[0]
        seconds = [svc.seconds(plan) for plan in svc.family.by_time]
        assert len(seconds) > 1 and min(seconds) > 0
        assert seconds[0] < svc.seconds(svc.family.top(None))  # the cheapest plan, cheaper than all-fine
        r = c.post("/classify", content=buf.getvalue(), headers={"content-type": "image/png"}, params={"budget": "0.3"})
        assert r.status_code == 200 and float(r.headers["x-anytime-predicted-ms"]) > 0, r.headers
