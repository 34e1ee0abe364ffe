"""Divergence of a modified model from its unmodified reference, on the same tokens."""
