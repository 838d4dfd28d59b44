"""Glyph classification: characters rendered from Debian's free fonts, split by font family.

An offline stand-in for Chars74K-Fnt that the bundled PSS-Net and CF-ViT demos train on
(docs/DATA_GLYPHS.md).  ``fonts`` finds and vets the fonts and splits the families,
``render`` draws one augmented sample, ``data`` builds and caches the splits
(``load_split``), ``baseline`` measures how hard the set is.
"""
