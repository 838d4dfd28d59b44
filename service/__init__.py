"""Anytime Serve: the HTTP service (FastAPI) around the model families in ``models``."""
