"""The built-in families, one serving module each over its ``models/<family>/`` package;
importing this package registers them (``service/registry.py``)."""

from service.families import arm, cfvit, pssnet, seqtr  # noqa: F401
