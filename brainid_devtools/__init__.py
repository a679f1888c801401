"""Helpers for the repository's tests, benchmarks and docs scripts; never installed or shipped.

Importable from the repository root: the test suite's conftest and the benchmarks put the root on
sys.path, the docs scripts run with `PYTHONPATH=.`.
"""
