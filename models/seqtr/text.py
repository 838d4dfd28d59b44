"""Referring-expression text: SeqTR's cleaning rules and word vocabulary (as in the official code).

The official pipeline lower-cases, deletes ``. , ' ! ? " ( ) * # : ;``, turns ``-`` and ``/``
into spaces, splits on whitespace, maps words through the dataset's ``token_to_ix.pkl``
(unknown -> UNK = 1) and zero-pads at the end to ``max_token``.  ``max_token`` matters:
the bi-GRU runs over the PAD positions, so the same sentence gives a different feature
with a different padding length.  An expression with no word crashes the official
max-pool; we reject it with :class:`EmptyExpression` instead.

``token_to_ix.pkl`` is a pickle, so it is opened with a restricted unpickler that admits
only a dict of str -> int; any other global (i.e. any code) raises.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

PAD, UNK, CLS = 0, 1, 2
SPECIALS = ("<pad>", "<unk>", "<cls>")

_DELETE = str.maketrans("", "", ".,'!?\"()*#:;")
_SPACE = str.maketrans({"-": " ", "/": " "})


class EmptyExpression(ValueError):
    """The expression has no word after cleaning (the official max-pool would crash)."""


def clean_string(expr: str) -> list[str]:
    """Words of ``expr`` by the official rules: lower, delete punctuation, '-' and '/' -> space."""
    return expr.lower().translate(_DELETE).translate(_SPACE).split()


class _DictOnlyUnpickler(pickle.Unpickler):
    """Admits only ``builtins.dict/str/int``: a str -> int dict needs nothing else, and any
    other global (a function, a class with ``__reduce__``) would be a way to run code."""

    _ALLOWED = {("builtins", "dict"): dict, ("builtins", "str"): str, ("builtins", "int"): int}

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"token_to_ix: refusing to load global {module}.{name}") from None


def load_token_to_ix(path: str | Path) -> dict[str, int]:
    """An official ``token_to_ix.pkl`` as a plain dict, verified to be str -> int."""
    data = Path(path).read_bytes()
    obj = _DictOnlyUnpickler(io.BytesIO(data)).load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{path}: entry {k!r}: {v!r} is not str -> int")
    return dict(obj)


class Vocabulary:
    """Word -> index map with the official specials (PAD=0, UNK=1, CLS=2)."""

    def __init__(self, token_to_ix: dict[str, int]):
        if len(set(token_to_ix.values())) != len(token_to_ix):
            raise ValueError("token_to_ix has duplicate indices")
        self.token_to_ix = dict(token_to_ix)

    def __len__(self) -> int:
        # Embedding rows needed: the official vocabularies are dense 0..V-1.
        return max(self.token_to_ix.values()) + 1 if self.token_to_ix else 0

    @classmethod
    def from_words(cls, words: list[str]) -> "Vocabulary":
        """PAD, UNK, CLS, then ``words`` in order (duplicates kept once), as the official builder."""
        t2i = {s: i for i, s in enumerate(SPECIALS)}
        for w in words:
            if w not in t2i:
                t2i[w] = len(t2i)
        return cls(t2i)

    @classmethod
    def from_pickle(cls, path: str | Path) -> "Vocabulary":
        return cls(load_token_to_ix(path))

    def words(self) -> list[str]:
        """All entries ordered by index (what :meth:`to_json` stores)."""
        return [w for w, _ in sorted(self.token_to_ix.items(), key=lambda kv: kv[1])]

    def encode(self, expr: str, max_token: int) -> list[int]:
        """Indices truncated / PAD-filled at the end to ``max_token``; unknown words -> UNK."""
        words = clean_string(expr)
        if not words:
            raise EmptyExpression(f"expression {expr!r} has no word after cleaning")
        ids = [self.token_to_ix.get(w, UNK) for w in words[:max_token]]
        return ids + [PAD] * (max_token - len(ids))

    def unknown_words(self, expr: str) -> list[str]:
        """Words that map to UNK (so the server can tell the caller)."""
        return [w for w in clean_string(expr) if w not in self.token_to_ix]

    def to_json(self) -> dict:
        return {"token_to_ix": self.token_to_ix}

    @classmethod
    def from_json(cls, data: dict | str) -> "Vocabulary":
        if isinstance(data, str):
            data = json.loads(data)
        return cls({str(k): int(v) for k, v in data["token_to_ix"].items()})
