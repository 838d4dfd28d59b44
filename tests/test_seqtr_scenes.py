"""The synthetic referring-expression scenes (models/seqtr/scenes.py): determinism, held-out
splits and phrasings, hard distractors, unique reference, exact masks and boxes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from models.seqtr import scenes as S

N = 60


@pytest.fixture(scope="module")
def test_set() -> list[S.Sample]:
    return S.generate("test", N, workers=1)


@pytest.fixture(scope="module")
def train_set() -> list[S.Sample]:
    return S.generate("train", N, workers=1)


def _digest(s: S.Sample) -> str:
    return hashlib.sha1(s.image.tobytes() + s.expression.encode()).hexdigest()


def test_deterministic_and_prefix_stable(test_set: list[S.Sample]) -> None:
    again = S.generate("test", 10, workers=1)
    assert [_digest(a) for a in again] == [_digest(b) for b in test_set[:10]]
    assert [a.held_out for a in again] == [b.held_out for b in test_set[:10]]


def test_workers_do_not_change_samples() -> None:
    assert [_digest(a) for a in S.generate("val", 8, workers=2)] == \
        [_digest(b) for b in S.generate("val", 8, workers=1)]


def test_splits_are_disjoint(train_set: list[S.Sample], test_set: list[S.Sample]) -> None:
    val = S.generate("val", N, workers=1)
    hashes = [{hashlib.sha1(s.image.tobytes()).hexdigest() for s in ds} for ds in (train_set, val, test_set)]
    assert all(len(h) == N for h in hashes)
    assert not (hashes[0] & hashes[1] or hashes[0] & hashes[2] or hashes[1] & hashes[2])


def test_image_and_objects(test_set: list[S.Sample]) -> None:
    for s in test_set:
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
        assert 4 <= len(s.objects) <= 7  # the target and >= 3 distractors
        t = s.objects[s.target]
        others = [o for i, o in enumerate(s.objects) if i != s.target]
        # hard distractors: neither the colour nor the shape alone names the target
        assert any(o.shape == t.shape for o in others) and any(o.colour == t.colour for o in others)
        assert s.box == t.box and s.polygon == t.polygon
    sized = S.generate("test", 4, size=96, workers=1)
    assert sized[0].image.shape == (96, 96, 3) and sized[0].mask.shape == (96, 96)


def test_every_expression_is_unique_under_the_evaluator(test_set: list[S.Sample], train_set: list[S.Sample]) -> None:
    for s in test_set + train_set:
        assert s.desc is not None
        assert S.resolve(s.desc, s.objects, 128) == s.target
        assert S.render(s.desc, s.phrasing) == s.expression


def test_evaluator_semantics() -> None:
    def obj(colour: str, shape: str, x: float, y: float, size: str = "small") -> S.SceneObject:
        return S.SceneObject(shape, colour, size, (0, 0, 0, 0), [], (x, y), 6.0, (0, 0, 0))

    objs = [obj("red", "circle", 20, 64), obj("red", "circle", 100, 64), obj("blue", "star", 60, 64),
            obj("red", "square", 62, 20)]
    d = S.Description
    rc = S.NP("red", "circle")
    assert S.resolve(d("attr", rc), objs, 128) is None  # two red circles
    assert S.resolve(d("attr", S.NP("blue")), objs, 128) == 2
    assert S.resolve(d("extreme", rc, direction="left"), objs, 128) == 0
    assert S.resolve(d("extreme", rc, direction="right"), objs, 128) == 1
    assert S.resolve(d("relation", rc, relation="left of", landmark=S.NP("blue", "star")), objs, 128) == 0
    assert S.resolve(d("relation", S.NP(), relation="above", landmark=S.NP("blue", "star")), objs, 128) == 3
    # a landmark that is not unique makes the relation meaningless
    assert S.resolve(d("relation", S.NP("blue"), relation="right of", landmark=rc), objs, 128) is None
    # borderline: the runner-up is only 3 px further left -> ambiguous, rejected
    close = [obj("red", "circle", 20, 30), obj("red", "circle", 23, 100), obj("blue", "star", 90, 64)]
    assert S.resolve(d("extreme", rc, direction="left"), close, 128) is None
    # "top left corner": a centre near the third-line is "maybe", so no unique reading
    corner = [obj("red", "circle", 15, 15), obj("red", "circle", 44, 20), obj("blue", "star", 100, 100)]
    assert S.resolve(d("region", rc, region="top left"), corner, 128) is None
    corner[1] = obj("red", "circle", 70, 20)
    assert S.resolve(d("region", rc, region="top left"), corner, 128) == 0


def test_mask_is_polygon_raster_and_box_is_tight(test_set: list[S.Sample]) -> None:
    for s in test_set[:30]:
        assert s.mask.dtype == bool and s.mask.any()
        assert np.array_equal(s.mask, S.rasterise(s.polygon, 128, 128))
        ys, xs = np.nonzero(s.mask)
        assert s.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        # the drawn pixels under the mask carry the object's colour (not the background)
        inside = s.image[s.mask].astype(float).mean(axis=0)
        assert np.abs(inside - np.array(s.objects[s.target].rgb)).max() < 40
        # masks of different objects never overlap
        masks = [S.rasterise(o.polygon, 128, 128) for o in s.objects]
        assert int(np.sum(masks, axis=0).max()) == 1


def test_held_out_phrasings(train_set: list[S.Sample], test_set: list[S.Sample]) -> None:
    assert not any(s.held_out or s.phrasing.startswith("H-") for s in train_set)
    assert any(s.held_out for s in test_set) and not all(s.held_out for s in test_set)
    assert all(s.held_out == s.phrasing.startswith("H-") for s in test_set)
    vocab = set(S.vocabulary_words())
    assert all(set(s.expression.split()) <= vocab for s in train_set)
    held = S.generate("test", 20, held_out_phrasings=True, workers=1)
    assert all(s.held_out for s in held)
    assert S.held_out_unknown_words() == ["which"]
    with pytest.raises(ValueError):
        S.generate("train", 2, held_out_phrasings=True)
    # the held-out templates produce word sequences no training template can
    train_ids = [t for t, (_, h, _) in S.TEMPLATES.items() if not h]
    for s in held:
        assert s.desc is not None
        assert s.expression not in {S.render(s.desc, t) for t in train_ids}


def test_vocabulary_is_fixed() -> None:
    v = S.vocabulary_words()
    assert v == S.vocabulary_words() and len(v) == len(set(v))
    assert v[:4] == ["the", "shape", "that", "is"] and "which" not in v


def test_wrong_expression_refers_to_another_object(test_set: list[S.Sample]) -> None:
    rng = np.random.default_rng(0)
    for s in test_set[:30]:
        d, _, expr, j = S.wrong_description(s, rng)
        assert j != s.target and expr != s.expression
        assert S.resolve(d, s.objects, 128) == j
        assert S.wrong_expression(s, np.random.default_rng(1))[1] != s.target


def test_preview_cli(tmp_path) -> None:
    S.main(["--split", "val", "--n", "2", "--out", str(tmp_path)])
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_arrays_cache(tmp_path, train_set: list[S.Sample]) -> None:
    a = S.load_arrays("train", 12, cache_dir=tmp_path, workers=1)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    b = S.load_arrays("train", 5, cache_dir=tmp_path)  # sliced from the cached 12
    assert len(list(tmp_path.glob("*.npz"))) == 1 and len(b) == 5
    for i in range(5):
        s = train_set[i]
        assert np.array_equal(a.images[i], s.image) and a.expressions[i] == s.expression
        assert np.array_equal(b.images[i], s.image)
        assert tuple(a.boxes[i]) == s.box and a.polygon(i) == [(float(np.float32(x)), float(np.float32(y)))
                                                               for x, y in s.polygon]
        assert np.array_equal(a.mask(i), s.mask)


def test_colour_decisive_pool(tmp_path, train_set: list[S.Sample]) -> None:
    from dataclasses import replace

    picked = [s for s in train_set if S.colour_decisive(s)]
    assert 0 < len(picked) < len(train_set)
    for s in picked:  # naming no colour would not pick the target alone
        d = s.desc
        alts = [replace(d, np=replace(d.np, colour=None))]
        if d.landmark is not None:
            alts.append(replace(d, landmark=replace(d.landmark, colour=None)))
        assert any(S.resolve(a, s.objects, 128) != s.target for a in alts)
    a = S.load_arrays("train", 20, cache_dir=tmp_path, workers=1, select="colour")
    assert a.expressions == [s.expression for s in train_set[:20] if S.colour_decisive(s)]
    assert a.source["select"] == "colour"
