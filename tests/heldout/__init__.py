"""Held-out acceptance suite (issue 11): models the book never uses and public bug reports.

A package, so that ``heldout/test_models.py`` and ``tests/test_models.py`` can be collected in one run.
"""
