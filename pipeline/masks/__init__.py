"""Phrase masks of the training images (artifacts/masks/): Grounded-SAM or the authors' released masks."""
