"""Shared test helpers (tests/ is on sys.path): configs, tiny images, subprocess and CLI runs, fault injection.

Test modules import from here, never from one another; fixtures stay in tests/conftest.py.
"""
