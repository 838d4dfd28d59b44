"""bench.memory_format: every ladder rung of the bundled PSS-Net timed channels-last (as
served) and NCHW, with the two layouts' logits equal to float rounding."""

from __future__ import annotations

import pytest

from bench import memory_format


def test_every_ladder_rung_is_timed_in_both_layouts_with_the_same_logits(capsys):
    try:
        from models.glyphs.data import load_split

        load_split("test", n=8)
    except Exception as e:  # the glyph data are generated locally, never committed
        pytest.skip(f"glyph test split unavailable: {e}")
    from models.pssnet.serving import PssNetModel
    from service.bundled import bundled

    ladder = [r.name for r in PssNetModel.from_checkpoint(bundled("pssnet"), int8=False).ladder]
    memory_format.main(["--rounds", "1", "--images", "8"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| rung")]
    assert [r[0].strip() for r in rows] == ladder
    for cells in rows:
        assert len(cells) == 11  # rung, 3 x (NCHW, channels-last, speed-up), max diff
        assert all(float(cells[i]) > 0 for i in (1, 2, 4, 5, 7, 8))
        assert float(cells[10]) < 1e-3  # the same network: float rounding only
