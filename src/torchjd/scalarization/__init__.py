"""Filled by a later part of the roadmap; importing it already works."""

__all__: list[str] = []
