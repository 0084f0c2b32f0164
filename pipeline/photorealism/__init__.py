"""Photorealism metrics: Fréchet distance between image-feature statistics (FID) and the feature extractors."""
