"""The engine: build.py (checkpoint -> engine folder), and the runtime that runs it."""
