"""Download the official ARM checkpoints (for users with internet access).

    python -m models.arm.download --dest checkpoints/
    python -m models.arm.download --dest checkpoints/ --mirror /path/or/url/with/the/files
    ANYTIME_ARM_CHECKPOINT=checkpoints/arm-fsrcnn.pth make serve

Files come from the authors' repository at a pinned commit and are verified against the
sha256 values below before they are kept; a file already present with the right hash is
not fetched again.  ``--mirror`` takes a base URL or a local folder holding the same
file names (tests use that).  The weights are the authors'; we do not redistribute them.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import urllib.request
from pathlib import Path

OFFICIAL_BASE = "https://github.com/chenbong/ARM-Net/raw/d663b4b34fc9128fbda5dc72f70148bb789e706b/ckpt"
OFFICIAL_FILES: dict[str, dict[str, str]] = {
    "fsrcnn": {
        "arm-fsrcnn.pth": "79bff9483eade94e90421149fe4e18005b551ab6c6e8a3569919972fd54fd44a",
        "arm-fsrcnn.state": "1c5512b2e43cc5bf0f685dc50da05f7cc38d56e21a90f8f879089932de9e6d12",
    },
    "carn": {
        "arm-carn.pth": "4296dbdb09804edb625da55f754977754b2d48e2b421e33d33b3807755a2517c",
        "arm-carn.state": "aa336b545c7618cbcb5de6656b5770f65c9654c1134ee6213aece9ca2a6d9302",
    },
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(source: str, target: Path) -> None:
    local = Path(source)
    if local.exists():
        shutil.copyfile(local, target)
        return
    with urllib.request.urlopen(source, timeout=60) as resp, target.open("wb") as out:
        shutil.copyfileobj(resp, out)


def download(dest: Path, backbones: list[str], mirror: str | None = None) -> list[Path]:
    """Fetch and verify the files of ``backbones`` into ``dest``; returns their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    base = (mirror or OFFICIAL_BASE).rstrip("/")
    got = []
    for bb in backbones:
        for name, digest in OFFICIAL_FILES[bb].items():
            target = dest / name
            if target.exists() and sha256(target) == digest:
                print(f"{name}: present, sha256 ok")
                got.append(target)
                continue
            tmp = target.with_suffix(target.suffix + ".part")
            print(f"{name}: fetching {base}/{name}", flush=True)
            try:
                _fetch(f"{base}/{name}", tmp)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise RuntimeError(f"could not fetch {base}/{name}: {exc}") from None
            actual = sha256(tmp)
            if actual != digest:
                tmp.unlink()
                raise RuntimeError(f"{name}: sha256 {actual} does not match the expected {digest}; file discarded")
            tmp.replace(target)
            print(f"{name}: sha256 ok")
            got.append(target)
    return got


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, required=True)
    ap.add_argument("--backbone", nargs="+", default=sorted(OFFICIAL_FILES), choices=sorted(OFFICIAL_FILES))
    ap.add_argument("--mirror", default=None, help="base URL or local folder to fetch from instead")
    args = ap.parse_args(argv)
    try:
        download(args.dest, args.backbone, args.mirror)
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
