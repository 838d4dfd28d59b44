"""SeqTR checkpoints: the official layout (synthesised), strict loading, bundles."""

from __future__ import annotations

import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from models.seqtr.checkpoint import (build_and_load, config_from_state_dict, load_bundle, load_official,
                                     read_checkpoint, save_bundle)
from models.seqtr.model import SEQTR_DET, SeqTR, seqtr_tiny
from models.seqtr.official_layout import official_shapes, synthesise_official_state_dict
from models.seqtr.serving import SeqTRGrounder
from models.seqtr.text import Vocabulary

torch.set_num_threads(1)
V = 200


def _words(v: int) -> list[str]:
    return [f"word{i}" for i in range(v - 3)]


@pytest.fixture(scope="module")
def det_ckpt(tmp_path_factory) -> dict:
    return synthesise_official_state_dict("det", vocab_size=V, seed=0, module_prefix=True)


@pytest.fixture(scope="module")
def det_path(tmp_path_factory, det_ckpt) -> str:
    p = tmp_path_factory.mktemp("seqtr") / "det.pth"
    torch.save(det_ckpt, p)
    return str(p)


def _small_input(model: SeqTR):
    img = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    text = torch.tensor([[5, 6, 7] + [0] * 12, [9] + [0] * 14])
    return img, mask, text


def test_official_layout_counts():
    shapes = official_shapes("det", vocab_size=V)
    assert len(shapes) == 521  # official det layout: 521 state-dict tensors incl. BN buffers (and the embedding)
    assert "lan_enc.embedding.weight" in shapes
    with torch.device("meta"):
        m = SeqTR(SEQTR_DET(V))
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == dict(shapes)
    n = sum(p.numel() for p in m.parameters())
    assert n == 104_274_377 + 300 * V  # the official det model's count (V = vocabulary size)
    split = {name: sum(p.numel() for p in getattr(m, name).parameters()) / 1e6 for name in ("vis_enc", "fusion", "head")}
    assert split["vis_enc"] == pytest.approx(56.3, abs=0.05) and split["fusion"] == pytest.approx(36.6, abs=0.05)
    assert split["head"] == pytest.approx(8.81, abs=0.01)
    assert sum(p.numel() for p in m.lan_enc.lstm.parameters()) / 1e6 == pytest.approx(2.50, abs=0.005)
    assert tuple(official_shapes("segm", n=18)["head.transformer.seq_positional_encoding.embedding.weight"]) == (37, 256)


def test_load_official_state_and_ema_with_module_prefix(det_path, det_ckpt):
    m, vocab, info = load_official(det_path)
    assert vocab is None
    assert info["task"] == "det" and info["vocab_size"] == V and info["num_bin"] == 1000
    assert info["module_prefix"] is True and info["weights"] == "state_dict" and info["num_tensors"] == 521
    assert info["loader"] == "weights_only" and info["epoch"] == 59
    assert set(info["available"]) == {"state_dict", "ema_state_dict"}
    want = det_ckpt["state_dict"]["module.head.predictor.2.fc.bias"]
    assert torch.equal(m.head.predictor[2].fc.bias, want)
    assert not m.lan_enc.embedding.weight.requires_grad and not m.training
    img, mask, text = _small_input(m)
    tok, score = m.generate(img, mask, text)
    assert tok.shape == (2, 4) and (tok < 1000).all() and torch.isfinite(score).all()
    with torch.no_grad():
        logits = m(img, mask, text, torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, 1001) and torch.isfinite(logits).all()
    e, _, info_e = load_official(det_path, which="ema_state_dict")
    assert info_e["weights"] == "ema_state_dict"
    assert torch.equal(e.head.predictor[2].fc.bias, want + 1.0)
    with pytest.raises(KeyError):
        load_official(det_path, which="nope")


def test_bare_state_dict_without_prefix_segm_and_vocab(tmp_path):
    ck = synthesise_official_state_dict("segm", N=18, vocab_size=V, seed=1)
    p = tmp_path / "segm_bare.pth"
    torch.save(ck["state_dict"], p)
    t2i = {w: i for i, w in enumerate(["<pad>", "<unk>", "<cls>"] + _words(V))}
    vp = tmp_path / "token_to_ix.pkl"
    vp.write_bytes(pickle.dumps(t2i))
    m, vocab, info = load_official(p, vp, max_token=20)
    assert info["task"] == "segm" and info["num_points"] == 18 and info["module_prefix"] is False
    assert info["weights"] == "bare" and m.cfg.max_token == 20 and len(vocab) == V
    img, mask, text = _small_input(m)
    tok, score = m.generate(img, mask, text)
    assert tok.shape == (2, 37) and torch.isfinite(score).all()
    # the wrong dataset's vocabulary is refused
    vp.write_bytes(pickle.dumps(dict(list(t2i.items())[:-5])))
    with pytest.raises(ValueError, match="embedding has"):
        load_official(p, vp)


def test_restricted_fallback_runs_no_code(tmp_path, det_ckpt):
    flag = tmp_path / "pwned"

    class Evil:  # a local class: weights_only refuses it, and it would run code if unpickled
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    ck = {"state_dict": det_ckpt["state_dict"], "scheduler": Evil(), "epoch": 3}
    p = tmp_path / "odd.pth"
    torch.save(ck, p)
    obj, loader = read_checkpoint(p)
    assert loader == "restricted" and not flag.exists()
    assert "Opaque" in type(obj["scheduler"]).__name__
    m, _, info = load_official(p)
    assert info["loader"] == "restricted" and info["epoch"] == 3 and not flag.exists()
    assert m.cfg.task == "det"


def test_mismatch_errors_list_keys(det_ckpt):
    sd = {k.removeprefix("module."): v for k, v in det_ckpt["state_dict"].items()}
    cfg = config_from_state_dict(sd)
    assert cfg == replace(SEQTR_DET(V), fuse_bot2mid=256, fuse_mid2top=768, fuse_top_mid=1792)
    bad = dict(sd)
    del bad["fusion.top_project.1.bn.running_var"]
    bad["head.extra.weight"] = torch.zeros(1)
    bad["head.predictor.0.fc.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as e:
        build_and_load(cfg, bad)
    msg = str(e.value)
    assert "fusion.top_project.1.bn.running_var" in msg and "head.extra.weight" in msg
    assert "head.predictor.0.fc.bias (7,) vs (256,)" in msg
    multi = dict(sd)
    multi["head.task_embedding.weight"] = torch.zeros(2, 256)
    multi["head.transformer.seq_positional_encoding.embedding.weight"] = torch.zeros(30, 256)
    with pytest.raises(NotImplementedError, match="multi-task"):
        config_from_state_dict(multi)
    odd = dict(sd)
    odd["head.transformer.seq_positional_encoding.embedding.weight"] = torch.zeros(6, 256)
    with pytest.raises(ValueError, match="6 rows"):
        config_from_state_dict(odd)


def test_grounder_from_official(det_path, tmp_path):
    t2i = {w: i for i, w in enumerate(["<pad>", "<unk>", "<cls>"] + _words(V))}
    vp = tmp_path / "t2i.pkl"
    vp.write_bytes(pickle.dumps(t2i))
    g = SeqTRGrounder.from_official(det_path, vp, max_token=15)
    assert g.task == "det" and g.num_points is None and g.long_side == 640 and g.max_token == 15
    assert g.padded_shape(427, 640) == (448, 640)
    item = g.prepare(np.zeros((40, 60, 3), np.uint8), "word1 word2 unseen")
    assert item.unknown_words == ["unseen"] and len(item.text_ids) == 15
    assert g.flops(448, 640)["total"] > 1e11


def test_bundle_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = seqtr_tiny("segm", vocab_size=12, num_points=6)
    m = SeqTR(cfg).eval()
    vocab = Vocabulary.from_words([f"w{i}" for i in range(9)])
    save_bundle(tmp_path / "b", m, cfg, vocab, {"trained_steps": 7})
    m2, v2, man = load_bundle(tmp_path / "b")
    assert man["trained_steps"] == 7 and man["family"] == "seqtr" and v2.token_to_ix == vocab.token_to_ix
    assert m2.cfg == cfg and not m2.training
    x = torch.rand(1, 3, 128, 96) * 255
    mask = torch.zeros(1, 128, 96, dtype=torch.bool)
    text = torch.tensor([[3, 4, 0, 0, 0, 0, 0, 0]])
    assert torch.equal(m.generate(x, mask, text)[0], m2.generate(x, mask, text)[0])
    g = SeqTRGrounder.from_bundle(tmp_path / "b")
    assert g.task == "segm" and g.num_points == 6 and g.long_side == 128
    with pytest.raises(ValueError):
        save_bundle(tmp_path / "c", m, cfg, Vocabulary.from_words(["a"]), {})
