"""bench.memory_format and bench.engines: every ladder rung of the bundled PSS-Net timed two
ways (channels-last against NCHW; torch against ONNX Runtime) with the same logits."""

from __future__ import annotations

import pytest

from bench import engines, memory_format
from models.common import engines as model_engines


def _ladder() -> list[str]:
    try:
        from models.glyphs.data import load_split

        load_split("test", n=8)
    except Exception as e:  # the glyph data are generated locally, never committed
        pytest.skip(f"glyph test split unavailable: {e}")
    from models.pssnet.serving import PssNetModel
    from service.bundled import bundled

    return [r.name for r in PssNetModel.from_checkpoint(bundled("pssnet"), int8=False).ladder]


def _rows(text: str) -> list[list[str]]:
    return [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and not line.startswith("| rung")]


def _check_pairs(rows: list[list[str]], ladder: list[str]) -> None:
    assert [r[0].strip() for r in rows] == ladder
    for cells in rows:
        assert len(cells) == 11  # rung, 3 x (first, second, speed-up), max diff
        assert all(float(cells[i]) > 0 for i in (1, 2, 4, 5, 7, 8))
        assert float(cells[10]) < 1e-3  # the same network: float rounding only


def test_every_ladder_rung_is_timed_in_both_layouts_with_the_same_logits(capsys):
    ladder = _ladder()
    memory_format.main(["--rounds", "1", "--images", "8"])
    _check_pairs(_rows(capsys.readouterr().out), ladder)


@pytest.mark.skipif(not model_engines.available(), reason="ONNX Runtime not installed (pip install 'anytime-serve[onnx]')")
def test_every_ladder_rung_is_timed_on_both_engines_with_the_same_logits(capsys):
    ladder = _ladder()
    engines.main(["--rounds", "1", "--images", "32"])
    timing, choice = capsys.readouterr().out.split("What engine=auto chose")
    _check_pairs(_rows(timing), ladder)
    picked = _rows(choice)
    assert [r[0].strip() for r in picked] == ladder
    assert all(c.strip() in ("torch", "onnxruntime", "openvino") for r in picked for c in r[1:])
