"""Datasets and their inputs: images, VOC and COCO splits, proposals, the toy set
(docs/layout.md)."""
