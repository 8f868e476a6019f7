"""Pure tensor maths: boxes, scale selection, projection and pyramid pooling (docs/layout.md).
No I/O, no config, nothing from the other folders but the device copies."""
