"""What runs the work: run-directory paths, atomic artefacts, locks, workers, torchrun, devices
(docs/layout.md)."""
