"""The class set: 0-9, A-Z, a-z with eight case pairs merged (c o p s v w x z into their
capitals), 54 classes.

Samples are scaled to fit the canvas, as a cropped character is, so the size that tells
``c`` from ``C`` in running text is gone.  Which pairs that leaves indistinguishable was
measured, not assumed: ``python -m models.glyphs.case_pairs`` trains the baseline CNN on
all 62 characters as classes and counts, per letter, the val samples of either case taken
for the other case (docs/DATA_GLYPHS.md has the table).  C O P S V W X Z were the eight most
swapped in both runs made (19-34% and 24-33%; 50% would be a coin flip), the next ones J/j
and U/u (whose u has a stem) 12-17%, the rest 11% or less, so those eight are merged:
keeping them apart would only add label noise, not fine detail.  The digit/letter
confusions (0/O/Q, 1/l/I/i, 5/S, 2/Z, 8/B, 6/b, 9/g/q) stay separate on purpose: they are
the fine detail a coarse view loses.
"""

from __future__ import annotations

# Lower case letters folded into their capital's class.
MERGED_LOWER = "copsvwxz"

DIGITS = "0123456789"
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LOWER = "abcdefghijklmnopqrstuvwxyz"


def class_chars() -> list[str]:
    """The characters of each class, in label order: one string per class, its first
    character the class name (a merged class holds the capital and the lower case)."""
    out = list(DIGITS)
    out += [u + u.lower() if u.lower() in MERGED_LOWER else u for u in UPPER]
    out += [c for c in LOWER if c not in MERGED_LOWER]
    return out


CLASS_CHARS: list[str] = class_chars()
CLASSES: list[str] = [c[0] for c in CLASS_CHARS]
ALL_CHARS: str = "".join(CLASS_CHARS)
