"""Inputs of the pipeline: training images, MultiGen prompt sets, PIE-Bench, category lists."""
