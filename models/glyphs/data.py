"""The glyph data set: ``load_split`` builds (once) and loads train / val / test.

Each split draws only on its own font design groups (``fonts``), so val and test fonts are
never seen in training.  Sample ``i`` of a split is a pure function of the split's seed,
``i`` and the font index: its label comes from a per-block permutation of the classes
(every block of ``len(classes)`` samples holds each class once, so any prefix is
balanced), its design group, file and character from a generator seeded by ``(seed, 0,
i)``, and its rendering from one seeded by ``(seed, 1, i)``.  So the first ``n`` samples
of the default split are the split of size ``n``, and the order in which workers render
cannot change a pixel.

Splits are cached as ``.npz`` under ``$ANYTIME_DATA_DIR/glyphs`` (default ``data/glyphs``,
git-ignored); the file name carries the split, size, count, GENERATOR_VERSION and the font
index key, so any change to the generator or the installed fonts makes a new file.

    python -m models.glyphs.data --splits train val test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
from PIL import features

from models.glyphs import fonts as F
from models.glyphs.classes import ALL_CHARS, CLASS_CHARS, CLASSES
from models.glyphs.render import render

GENERATOR_VERSION = 3  # bump on any change to rendering, sampling or the class set
DEFAULT_N = {"train": 50_000, "val": 5_000, "test": 5_000}
SEEDS = {"train": 1001, "val": 2002, "test": 3003}
CHUNK = 1000  # samples per worker task (and per progress line)


@dataclass
class GlyphSet:
    """A split: images (N, size, size, 3) uint8 RGB, labels (N,) int64 into ``classes``,
    the font family of each sample, and ``source`` (fonts, seed, versions) for manifests."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    families: list[str]
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def _worker_count(workers: int | None) -> int:
    if workers is not None:
        return max(1, workers)
    env = os.environ.get("ANYTIME_GLYPH_WORKERS")
    return max(1, int(env)) if env else min(2, os.cpu_count() or 1)


def plan(groups: Sequence[F.DesignGroup], n: int, seed: int,
         class_chars: Sequence[str] = CLASS_CHARS) -> list[tuple[int, int, str, str]]:
    """(label, file index into the flattened group files, font path, character) per sample."""
    c = len(class_chars)
    flat = [f for g in groups for f in g.files]
    first = np.cumsum([0] + [len(g.files) for g in groups])
    out = []
    perm = None
    for i in range(n):
        if i % c == 0:
            perm = np.random.default_rng([seed, 2, i // c]).permutation(c)
        label = int(perm[i % c])
        r = np.random.default_rng([seed, 0, i])
        g = int(r.integers(len(groups)))
        fi = int(first[g] + r.integers(len(groups[g].files)))
        chars = class_chars[label]
        out.append((label, fi, flat[fi].path, chars[int(r.integers(len(chars)))]))
    return out


def _render_chunk(args: tuple[list[tuple[int, str, str]], int, int, str]) -> tuple[list[int], np.ndarray]:
    jobs, size, seed, neighbours = args
    imgs = np.empty((len(jobs), size, size, 3), np.uint8)
    for k, (i, path, ch) in enumerate(jobs):
        imgs[k] = render(path, ch, np.random.default_rng([seed, 1, i]), size, neighbours)
    return [i for i, _, _ in jobs], imgs


def generate(groups: Sequence[F.DesignGroup], n: int, size: int = 32, seed: int = 0,
             class_chars: Sequence[str] = CLASS_CHARS, workers: int | None = None,
             desc: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(images, labels, family per sample, file per sample) for ``n`` samples drawn from
    ``groups``; no caching.  Work is sorted by font file so each worker keeps its glyphs."""
    if not groups or not all(g.files for g in groups):
        raise ValueError("every design group needs at least one font file")
    flat = [f for g in groups for f in g.files]
    planned = plan(groups, n, seed, class_chars)
    order = sorted(range(n), key=lambda i: (planned[i][2], i))
    chunks = [[(i, planned[i][2], planned[i][3]) for i in order[s:s + CHUNK]] for s in range(0, n, CHUNK)]
    neighbours = "".join(class_chars)
    images = np.empty((n, size, size, 3), np.uint8)
    start, done = time.monotonic(), 0
    nw = _worker_count(workers)

    def consume(results: Iterable[tuple[list[int], np.ndarray]]) -> None:
        nonlocal done
        for idx, imgs in results:
            images[idx] = imgs
            done += len(idx)
            if desc:
                el = time.monotonic() - start
                print(f"{desc}: {done}/{n} ({done / el:.0f}/s, {el:.0f} s)", file=sys.stderr, flush=True)

    tasks = [(c, size, seed, neighbours) for c in chunks]
    if nw == 1 or len(chunks) == 1:
        consume(map(_render_chunk, tasks))
    else:
        # fork: the workers need no re-import of the caller's script (spawn would re-run an
        # unguarded one); they share nothing mutable with the parent.
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(nw, mp_context=ctx) as ex:
            consume(ex.map(_render_chunk, tasks))
    labels = np.array([p[0] for p in planned], np.int64)
    return images, labels, [flat[p[1]].family for p in planned], [p[2] for p in planned]


def _cache_stem(split: str, size: int, font_key: str) -> str:
    return f"{split}-{size}px-g{GENERATOR_VERSION}-f{font_key}"


def _cached(split: str, size: int, n: int, font_key: str) -> Path | None:
    """The smallest cache file of this split / size / version / fonts with at least n samples."""
    stem = _cache_stem(split, size, font_key)
    best = None
    for p in (F.DATA_DIR / "glyphs").glob(f"{stem}-n*.npz"):
        m = re.fullmatch(re.escape(stem) + r"-n(\d+)\.npz", p.name)
        if m and int(m.group(1)) >= n and (best is None or int(m.group(1)) < best[0]):
            best = (int(m.group(1)), p)
    return None if best is None else best[1]


def source_info(split: str, size: int, n: int, groups: Sequence[F.DesignGroup], index: dict) -> dict:
    return {
        "dataset": "anytime-serve glyphs (Chars74K-Fnt style, rendered from Debian font packages)",
        "split": split,
        "size": size,
        "n": n,
        "seed": SEEDS[split],
        "generator_version": GENERATOR_VERSION,
        "font_index_key": index.get("key"),
        "font_index_version": F.INDEX_VERSION,
        "pillow": PIL.__version__,
        "freetype": features.version("freetype2"),
        "classes": CLASSES,
        "class_chars": CLASS_CHARS,
        "groups": {g.name: list(g.families) for g in groups},
        "fonts": sorted(f.path for g in groups for f in g.files),
        "packages": sorted({f.package for g in groups for f in g.files}),
        "command": f"python -m models.glyphs.data --splits {split} --size {size}",
    }


def load_split(split: str, size: int = 32, n: int | None = None, workers: int | None = None,
               progress: bool = False) -> GlyphSet:
    """Split ``train``, ``val`` or ``test`` at ``size`` x ``size`` pixels; its first ``n``
    samples (default DEFAULT_N[split]).  Generated on first use and cached; a cached larger
    set of the same recipe is sliced rather than generated again."""
    if split not in DEFAULT_N:
        raise ValueError(f"unknown split {split!r}; use train, val or test")
    n = DEFAULT_N[split] if n is None else int(n)
    if n <= 0 or size < 8:
        raise ValueError("n must be positive and size at least 8")
    index = F.font_index(log=progress)
    groups = F.split_groups(split)
    path = _cached(split, size, n, index["key"])
    if path is None:
        images, labels, families, _ = generate(groups, n, size, SEEDS[split], workers=workers,
                                               desc=f"glyphs {split} {size}px" if progress else None)
        source = source_info(split, size, n, groups, index)
        path = F.DATA_DIR / "glyphs" / f"{_cache_stem(split, size, index['key'])}-n{n}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, images=images, labels=labels, families=np.array(families), source=json.dumps(source))
        tmp.replace(path)
    with np.load(path, allow_pickle=False) as z:
        source = json.loads(str(z["source"]))
        source.update(n=n, cache=str(path))
        return GlyphSet(images=z["images"][:n], labels=z["labels"][:n], classes=list(CLASSES),
                        families=[str(f) for f in z["families"][:n]], source=source)


def describe(ds: GlyphSet) -> str:
    counts = np.bincount(ds.labels, minlength=len(ds.classes))
    fams = sorted(set(ds.families))
    groups = ds.source.get("groups", {})
    return (f"{ds.source['split']}: {len(ds)} images {ds.images.shape[1]}x{ds.images.shape[2]}, "
            f"{len(ds.classes)} classes ({counts.min()}-{counts.max()} per class), "
            f"{len(groups)} design groups, {len(fams)} families\n"
            f"    groups: {', '.join(groups)}")


def main(argv: Iterable[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build (and cache) the glyph splits and print a summary.")
    ap.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=list(DEFAULT_N))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n", type=int, default=None, help="samples per split (default: the split's default)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: ANYTIME_GLYPH_WORKERS or 2)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    print(f"classes ({len(CLASSES)}): {' '.join(''.join(c) for c in CLASS_CHARS)}")
    for split in args.splits:
        t = time.monotonic()
        ds = load_split(split, args.size, args.n, workers=args.workers, progress=True)
        print(describe(ds))
        print(f"    {time.monotonic() - t:.1f} s, cache {ds.source['cache']}")
    print(f"characters: {ALL_CHARS}")


if __name__ == "__main__":
    main()
