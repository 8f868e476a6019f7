"""Training: window sampling, fine-tuning (head and end to end), SVMs, box regression
(docs/layout.md)."""
