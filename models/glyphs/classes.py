"""The class set: 0-9, A-Z, a-z with the case pairs merged whose lower case is a scaled copy
of the upper case.

Samples are scaled to fit the canvas (as a cropped character is), so the size that tells
``c`` from ``C`` in running text is gone; keeping such pairs apart would only add label
noise, not fine detail.  Which pairs to merge was measured over the installed fonts
(``python -m models.glyphs.fonts --case-pairs``; docs/DATA_GLYPHS.md): a pair is merged when
its lower and upper case differ, after fitting both to the same box, by less than the
closest different-letter pairs do in most fonts.  Pairs that differ in shape (a/A, b/B,
i/I, l/L, ...) stay apart, and the digit/letter confusions (0/O, 1/l/I, 5/S, 2/Z, 8/B, 6/b,
9/g/q) are kept on purpose: they are the fine detail a coarse view loses.
"""

from __future__ import annotations

# Lower case letters folded into their upper case class.
MERGED_LOWER = "copsvwxz"

DIGITS = "0123456789"
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LOWER = "abcdefghijklmnopqrstuvwxyz"


def class_chars() -> list[str]:
    """The characters of each class, in label order: each string is one class (the first
    character is its name; a merged class holds the upper and the lower case)."""
    out = [d for d in DIGITS]
    out += [u + u.lower() if u.lower() in MERGED_LOWER else u for u in UPPER]
    out += [c for c in LOWER if c not in MERGED_LOWER]
    return out


CLASS_CHARS: list[str] = class_chars()
CLASSES: list[str] = [c[0] for c in CLASS_CHARS]
ALL_CHARS: str = "".join(CLASS_CHARS)
