"""Cross-attention maps per token: recording while sampling, the figures, and the grounding share."""
