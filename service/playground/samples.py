"""Make the playground's bundled samples (committed; the server only reads them):

    python -m service.playground.samples      # needs `make data` (fonts) and scikit-image

``photo.png``: a 128 x 96 crop of scikit-image's ``chelsea`` (a public-domain photo of a
cat), for /superresolve; ``glyph.png``: the first glyph of the held-out test split, for
/classify; ``scene.png``: the first held-out test scene, with its referring expression and
true box in ``samples.json``, for /ground.  None of them was used in training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLES = Path(__file__).parent / "samples"


def main() -> None:
    from skimage import data as skdata

    from models.glyphs.data import load_split
    from models.seqtr.scenes import generate

    SAMPLES.mkdir(exist_ok=True)
    Image.fromarray(skdata.chelsea()[60:156, 100:228]).save(SAMPLES / "photo.png", optimize=True)
    glyphs = load_split("test", size=32, n=8)
    Image.fromarray(glyphs.images[0]).save(SAMPLES / "glyph.png", optimize=True)
    scene = generate("test", 1)[0]
    Image.fromarray(scene.image).save(SAMPLES / "scene.png", optimize=True)
    index = {"photo.png": {"endpoint": "/superresolve", "title": "photo (cat, 128 x 96)"},
             "glyph.png": {"endpoint": "/classify", "title": f"glyph (true label {glyphs.classes[glyphs.labels[0]]})"},
             "scene.png": {"endpoint": "/ground", "title": "scene (128 x 128)", "expression": scene.expression,
                           "box": [round(float(v), 1) for v in scene.box]}}
    (SAMPLES / "samples.json").write_text(json.dumps(index, indent=2) + "\n")
    for name in index:
        print(name, np.asarray(Image.open(SAMPLES / name)).shape)


if __name__ == "__main__":
    main()
