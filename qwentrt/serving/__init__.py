"""Serving: the Triton model repository (repository.py), its Python-backend models (models/ and the
backends they load), and finding/starting tritonserver (server.py)."""
