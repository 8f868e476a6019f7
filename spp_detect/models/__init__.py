"""Trunks, their weights and the trained detector's parts (docs/layout.md)."""
