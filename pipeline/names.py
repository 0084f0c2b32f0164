"""Names shared by the stages that write metrics and the report that reads them.

Kept apart from the code that computes the metrics, so the report's inputs (and so its cache key) change
only when one of these names does, not when a metric computation is edited.
"""

from __future__ import annotations

# MultiGen levels: MG_k = share of images in which at least k of the prompt's objects are found
MG_LEVELS = (1, 2, 3, 4, 5)

# PIE-Bench metric -> (name in the table / metrics JSON, factor) — SPEC §5.6
PIEBENCH_KEYS = {
    "structure_distance": ("structure_distance_x1e3", 1e3),
    "psnr_unedit_part": ("psnr_unedit_part", 1.0),
    "lpips_unedit_part": ("lpips_unedit_part_x1e3", 1e3),
    "mse_unedit_part": ("mse_unedit_part_x1e4", 1e4),
    "ssim_unedit_part": ("ssim_unedit_part_x1e2", 1e2),
    "clip_similarity_source_image": ("clip_similarity_source_image", 1.0),
    "clip_similarity_target_image": ("clip_whole", 1.0),
    "clip_similarity_target_image_edit_part": ("clip_edited", 1.0),
}

# TokenCompose's cross-attention group names of the SD1.4 UNet, in display order (input side to output side)
GROUP_ORDER = ("down_64", "down_32", "down_16", "mid_8", "up_16", "up_32", "up_64")
