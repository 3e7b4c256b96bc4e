"""Attention backends; each computes exactly the predicate of kernels/masks.py (see docs/kernels.md)."""
