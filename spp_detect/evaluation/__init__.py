"""Evaluation and what people look at: the run report (docs/layout.md)."""
