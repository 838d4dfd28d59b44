"""Offline photo data for ARM: the deterministic train / validation / test split.

Sources (installable offline from the package registries): Debian's ``mate-backgrounds`` and
``plasma-workspace-wallpapers`` photos (train and validation) and the colour photos
bundled in the scikit-image wheel (test, a Set5/Set14-like set).  Split ``train-ext`` adds
the 15 photographs of ``lomiri-wallpapers-16.04`` and ``lomiri-wallpapers-20.04`` to
``train`` (validation and test are unchanged; docs/ARM.md says how they were chosen).  The wallpapers are
JPEGs at quality ~70-75, so each is halved with MATLAB bicubic before use as ground
truth; otherwise the model would learn to reproduce block artefacts.  LR images are
MATLAB-bicubic x1/4 of the mod-4 cropped HR, as in ARM's protocol.  Prepared pairs are
cached as ``.npz`` under the data directory (never committed).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.common.matlab_resize import downscale_x4_uint8, imresize

MATE_DIR = Path("/usr/share/backgrounds/mate/nature")
PLASMA_DIR = Path("/usr/share/wallpapers")
MATE_PHOTOS = ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird",
               "RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower")
PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow",
                 "FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path", "summer_1am")
# lomiri-wallpapers-16.04 / -20.04 (Debian main, CC-BY / CC-BY-SA / CC0): the photographs
# only, chosen by eye on a contact sheet; their renders and gradients (umang, Fossa,
# Infinite-Sea, Painting-Colors, the 16.04 default) are left out, as are every image of
# ukui-wallpapers, lomiri-wallpapers and gnome-backgrounds 43 (all renders).  No photo
# here is a resized copy of another or of a train/val/test photo (grey 32x32 thumbnails
# correlate at most 0.84 with any other).
EXTRA_DIR = Path("/usr/share/backgrounds")
EXTRA_PHOTOS = ("Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace",
                "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi",
                "analogpattern_by_Peter_Nerlich", "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi",
                "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
                "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt",
                "sunset_by_Aitzol_Berasategi", "Kleiber_by_Lukas_Baubkus")
VALIDATION = ("Garden", "Storm", "Kite", "FallenLeaf")  # the table is built on these only
SKIMAGE_TEST = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                "hubble_deep_field.jpg", "retina.jpg", "ihc.png")

DATA_DIR = Path(os.environ.get("ANYTIME_DATA_DIR", Path(__file__).resolve().parents[2] / "data"))
PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers", "lomiri-wallpapers-16.04",
            "lomiri-wallpapers-20.04")  # the Makefile's `data` target installs the same
INSTALL_HINT = ("apt-get install -y " + " ".join(PACKAGES) + "; "
                "pip install scikit-image")


@dataclass(frozen=True)
class Photo:
    name: str
    path: Path
    halve: bool  # JPEG wallpapers are halved to suppress compression artefacts


def _plasma_path(name: str) -> Path:
    """The largest size of a Plasma wallpaper; without the package, its images folder (which
    ``hr_lr_pair`` reports as missing), so that the splits never depend on what is installed."""
    images = PLASMA_DIR / name / "contents" / "images"
    sizes = list(images.glob("*.jpg"))
    if not sizes:
        return images
    return max(sizes, key=lambda p: np.prod([int(v) for v in p.stem.split("x")]))


def split(name: str) -> list[Photo]:
    """The photos of split ``train``, ``train-ext``, ``val`` or ``test``, in a fixed order."""
    if name == "test":
        import skimage

        root = Path(skimage.__file__).parent / "data"
        return [Photo(Path(f).stem, root / f, False) for f in SKIMAGE_TEST]
    wallpapers = [Photo(n, MATE_DIR / f"{n}.jpg", True) for n in MATE_PHOTOS]
    wallpapers += [Photo(n, _plasma_path(n), True) for n in PLASMA_PHOTOS]
    if name == "val":
        return [p for p in wallpapers if p.name in VALIDATION]
    if name == "train":
        return [p for p in wallpapers if p.name not in VALIDATION]
    if name == "train-ext":
        return split("train") + [Photo(n, EXTRA_DIR / f"{n}.jpg", True) for n in EXTRA_PHOTOS]
    raise ValueError(f"unknown split {name!r}; use train, train-ext, val or test")


def load_rgb(path: Path) -> np.ndarray:
    """Any image file as HxWx3 uint8 RGB (grey and alpha images converted)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def modcrop(img: np.ndarray, m: int = 4) -> np.ndarray:
    h, w = img.shape[:2]
    return img[: h - h % m, : w - w % m]


def hr_lr_pair(photo: Photo) -> tuple[np.ndarray, np.ndarray]:
    """(HR, LR) uint8 RGB for a photo, cached on disk by source path and recipe."""
    key = hashlib.sha1(f"{photo.path}|{photo.halve}|v1".encode()).hexdigest()[:12]
    cache = DATA_DIR / "arm_pairs" / f"{photo.name}-{key}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return z["hr"], z["lr"]
    if not photo.path.is_file():
        raise FileNotFoundError(f"{photo.path} is missing; install the offline photos: {INSTALL_HINT}")
    hr = load_rgb(photo.path)
    if photo.halve:
        hr = np.clip(np.rint(imresize(hr, 0.5)), 0, 255).astype(np.uint8)
    hr = modcrop(hr, 4)
    lr = downscale_x4_uint8(hr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, hr=hr, lr=lr)
    return hr, lr


def load_split(name: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(p.name, *hr_lr_pair(p)) for p in split(name)]


def load_folder(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, HR, LR) for every image in a folder: HR mod-4 cropped, LR by MATLAB bicubic."""
    exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in exts)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(exts))}) in {folder}")
    out = []
    for f in files:
        hr = modcrop(load_rgb(f), 4)
        out.append((f.stem, hr, downscale_x4_uint8(hr)))
    return out


class PatchSampler:
    """Random aligned (LR 32x32, HR 128x128) training pairs with flips and transposes.

    Images are drawn in proportion to their area so every pixel is equally likely."""

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], lr_patch: int = 32, seed: int = 0) -> None:
        self.pairs = [(hr, lr) for hr, lr in pairs if min(lr.shape[:2]) >= lr_patch]
        if not self.pairs:
            raise ValueError("no training image is large enough for one patch")
        areas = np.array([lr.shape[0] * lr.shape[1] for _, lr in self.pairs], dtype=np.float64)
        self.p = areas / areas.sum()
        self.size = lr_patch
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(LR, HR) float32 NCHW in [0, 1]."""
        s, rng = self.size, self.rng
        lrs, hrs = [], []
        for i in rng.choice(len(self.pairs), size=n, p=self.p):
            hr, lr = self.pairs[i]
            y = rng.integers(0, lr.shape[0] - s + 1)
            x = rng.integers(0, lr.shape[1] - s + 1)
            lp, hp = lr[y:y + s, x:x + s], hr[4 * y:4 * (y + s), 4 * x:4 * (x + s)]
            if rng.random() < 0.5:
                lp, hp = lp[:, ::-1], hp[:, ::-1]
            if rng.random() < 0.5:
                lp, hp = lp[::-1], hp[::-1]
            if rng.random() < 0.5:
                lp, hp = lp.transpose(1, 0, 2), hp.transpose(1, 0, 2)
            lrs.append(lp)
            hrs.append(hp)
        to = lambda a: np.ascontiguousarray(np.stack(a).transpose(0, 3, 1, 2), dtype=np.float32) / 255.0  # noqa: E731
        return to(lrs), to(hrs)
