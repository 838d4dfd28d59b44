"""Content negotiation for image responses (RFC 9110 Accept with q-values)."""

from __future__ import annotations

OFFERED = ("image/png", "image/webp", "image/jpeg")  # our preference on ties


def negotiate(accept: str | None, offered: tuple[str, ...] = OFFERED) -> str | None:
    """The offered type the client rates highest; None when it accepts none of them.
    No Accept header means anything (PNG)."""
    if not accept or not accept.strip():
        return offered[0]
    ranges: list[tuple[str, float]] = []
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        if not fields[0]:
            continue
        q = 1.0
        for f in fields[1:]:
            if f.lower().startswith("q="):
                try:
                    q = min(1.0, max(0.0, float(f[2:])))
                except ValueError:
                    q = 0.0
        ranges.append((fields[0].lower(), q))

    def quality(mt: str) -> float:
        major = mt.split("/")[0]
        best, specificity = 0.0, -1
        for rng, q in ranges:
            s = 2 if rng == mt else 1 if rng == f"{major}/*" else 0 if rng == "*/*" else -1
            if s > specificity:
                best, specificity = q, s
        return best if specificity >= 0 else 0.0

    scored = [(quality(mt), -i, mt) for i, mt in enumerate(offered)]
    q, _, mt = max(scored)
    return mt if q > 0 else None
