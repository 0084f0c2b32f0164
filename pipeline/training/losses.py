"""TokenCompose's grounding losses on captured cross-attention maps, exactly as SPEC §1.4 describes.

For one group (e.g. ``up_64``) with L layers of maps A (batch, heads, res*res, 77), words w with sub-token
sets S_w and binary masks M_w at ``res`` (bilinear resize, antialias=False, then ``> 0``):

* token loss   = (1/|words|) Σ_layers Σ_w (1/|S_w|) Σ_{s∈S_w} (1 - mean_heads ΣA_s·M_w / ΣA_s)²
* pixel loss   = (1/|words|) Σ_w BCE(Σ_{s∈S_w} mean_{layers,heads} A_s, M_w)   (BCE mean over pixels)

Groups are summed (not averaged); layers are summed within a group for the token loss. Everything is
vectorised over layers, batch, words and sub-tokens: words are padded to the largest word count and
sub-tokens to the largest sub-token count in the batch, with validity masks. A batch sample without any
word contributes zero grounding loss; the batch loss is the mean over all samples of the batch (so batch
B × accumulation 1 gives the same gradient as batch 1 × accumulation B, the original's setting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from pipeline.attention import check_group_names, mask_ratios, side_of
from pipeline.config import NonNegativeFloat


@dataclass(frozen=True)
class LossCfg:
    """Params section ``loss``: grounding loss weights and the cross-attention groups they use."""

    token_weight: NonNegativeFloat
    pixel_weight: NonNegativeFloat
    layers: list[str]

    def __post_init__(self) -> None:
        check_group_names(self.layers)
        if not self.layers and (self.token_weight or self.pixel_weight):
            raise ValueError("layers is empty but a grounding weight is not 0: name the cross-attention groups "
                             "the losses use (e.g. [mid_8, up_16, up_32, up_64]), or set both weights to 0")


@dataclass
class GroundingTargets:
    """Word masks and token positions of a batch, padded.

    Attributes:
        masks: (batch, words, R, R) float or bool, binary masks at the training resolution R.
        token_ids: (batch, words, subtokens) long, positions in the 77-token sequence (padding: 0).
        token_valid: (batch, words, subtokens) bool, False on padding.
    """

    masks: torch.Tensor
    token_ids: torch.Tensor
    token_valid: torch.Tensor

    @property
    def word_valid(self) -> torch.Tensor:
        """(batch, words) bool: the word has at least one sub-token."""
        return self.token_valid.any(-1)

    def to(self, device: torch.device | str) -> "GroundingTargets":
        """The same targets on ``device``."""
        return GroundingTargets(self.masks.to(device), self.token_ids.to(device), self.token_valid.to(device))

    @classmethod
    def from_lists(cls, masks: Sequence[Sequence[torch.Tensor]], token_ids: Sequence[Sequence[Sequence[int]]],
                   resolution: int) -> "GroundingTargets":
        """Pad per-sample lists: ``masks[b][w]`` (R, R) and ``token_ids[b][w]`` (list of positions).

        Samples may have no words. Raises ``ValueError`` on a word without tokens or a mask of wrong size.
        """
        batch = len(masks)
        n_words = max([len(m) for m in masks] + [1])
        n_sub = max([len(t) for ids in token_ids for t in ids] + [1])
        out_masks = torch.zeros(batch, n_words, resolution, resolution)
        out_ids = torch.zeros(batch, n_words, n_sub, dtype=torch.long)
        valid = torch.zeros(batch, n_words, n_sub, dtype=torch.bool)
        for b, (sample_masks, sample_ids) in enumerate(zip(masks, token_ids, strict=True)):
            for w, (mask, ids) in enumerate(zip(sample_masks, sample_ids, strict=True)):
                if len(ids) == 0:
                    raise ValueError(f"sample {b} word {w}: no token positions; drop unaligned words first")
                if tuple(mask.shape) != (resolution, resolution):
                    raise ValueError(f"sample {b} word {w}: mask shape {tuple(mask.shape)}, expected "
                                     f"({resolution}, {resolution}) (the training resolution)")
                out_masks[b, w] = mask.float()
                out_ids[b, w, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
                valid[b, w, : len(ids)] = True
        return cls(out_masks, out_ids, valid)


@dataclass
class GroundingLoss:
    """Batch grounding losses (scalars, unweighted) and their per-group parts."""

    token: torch.Tensor
    pixel: torch.Tensor
    token_by_group: dict[str, torch.Tensor] = field(default_factory=dict)
    pixel_by_group: dict[str, torch.Tensor] = field(default_factory=dict)


def resize_masks(masks: torch.Tensor, res: int) -> torch.Tensor:
    """(B, W, R, R) masks -> (B, W, res*res) float {0, 1}: bilinear, antialias=False, then ``> 0``.

    Matches torchvision 0.14's ``transforms.Resize((res, res))`` on tensors used by the original code.
    """
    b, w = masks.shape[:2]
    small = F.interpolate(masks.float().flatten(0, 1)[:, None], size=(res, res), mode="bilinear",
                          align_corners=False, antialias=False)
    return (small > 0).float().view(b, w, res * res)


def gather_token_maps(maps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Columns of the words' sub-tokens: (L, B, h, P, K) maps, (B, W, S) ids -> (L, B, h, P, W, S) float32."""
    n_layers, b, h, p, k = maps.shape
    _, w, s = token_ids.shape
    if int(token_ids.max()) >= k:
        raise ValueError(f"token position {int(token_ids.max())} is outside the {k} attention keys; "
                         "captions must fit the 77-token context")
    index = token_ids.reshape(1, b, 1, 1, w * s).expand(n_layers, b, h, p, w * s)
    return maps.gather(-1, index).float().view(n_layers, b, h, p, w, s)


def _per_sample_mean(per_word: torch.Tensor, word_valid: torch.Tensor) -> torch.Tensor:
    """(B, W) values -> (B,) mean over valid words; 0 for a sample without words."""
    n = word_valid.sum(-1)
    total = torch.where(word_valid, per_word, torch.zeros_like(per_word)).sum(-1)
    return total / n.clamp(min=1)


def token_loss(cols: torch.Tensor, masks_small: torch.Tensor, targets: GroundingTargets) -> torch.Tensor:
    """Per-sample token loss of one group: (L, B, h, P, W, S) columns -> (B,) (SPEC §1.4.2)."""
    valid = targets.token_valid
    ratio = mask_ratios(cols, masks_small).mean(dim=2)  # (L, B, W, S): heads averaged inside the square
    per_sub = torch.where(valid, (1.0 - ratio) ** 2, torch.zeros_like(ratio))
    per_word = per_sub.sum(-1) / valid.sum(-1).clamp(min=1)  # sub-token mean
    return _per_sample_mean(per_word.sum(0), targets.word_valid)  # layers summed


def pixel_loss(cols: torch.Tensor, masks_small: torch.Tensor, targets: GroundingTargets) -> torch.Tensor:
    """Per-sample pixel loss of one group: (L, B, h, P, W, S) columns -> (B,) (SPEC §1.4.3)."""
    avg = cols.mean(dim=(0, 2))  # (B, P, W, S): heads and layers averaged
    prob = torch.where(targets.token_valid[:, None], avg, torch.zeros_like(avg)).sum(-1)  # sub-token sum
    prob = prob.clamp(0.0, 1.0).transpose(1, 2)  # (B, W, P); softmax bounds it, clamp guards rounding
    bce = F.binary_cross_entropy(prob, masks_small, reduction="none").mean(-1)
    return _per_sample_mean(bce, targets.word_valid)


def grounding_loss(maps: dict[str, list[torch.Tensor]], targets: GroundingTargets,
                   groups: Sequence[str]) -> GroundingLoss:
    """Token and pixel losses summed over ``groups``, each the mean over the batch.

    Args:
        maps: group -> list of (B, h, res*res, K) attention probabilities (``AttentionStore.maps``).
        targets: the batch's word masks and token positions.
        groups: groups to use (e.g. ``["mid_8", "up_16", "up_32", "up_64"]``).
    """
    targets = _on_device(targets, maps, groups)
    token_by, pixel_by = {}, {}
    with torch.autocast(device_type=targets.masks.device.type, enabled=False):
        for group in groups:
            layer_maps = maps.get(group) or []
            if not layer_maps:
                raise ValueError(f"no captured maps for group {group!r}; capture it (attention.capturing) "
                                 "and run the UNet forward before computing the loss")
            stacked = torch.stack(layer_maps)  # (L, B, h, P, K)
            res = side_of(stacked.shape[3], group)
            cols = gather_token_maps(stacked, targets.token_ids)
            masks_small = resize_masks(targets.masks, res)
            token_by[group] = token_loss(cols, masks_small, targets).mean()
            pixel_by[group] = pixel_loss(cols, masks_small, targets).mean()
    zero = targets.masks.new_zeros(())
    return GroundingLoss(sum(token_by.values(), zero), sum(pixel_by.values(), zero), token_by, pixel_by)


def _on_device(targets: GroundingTargets, maps: dict[str, list[torch.Tensor]], groups: Sequence[str]):
    for group in groups:
        if maps.get(group):
            return targets.to(maps[group][0].device)
    return targets
