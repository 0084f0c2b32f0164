"""Cross-attention capture through diffusers' attention-processor API (SPEC §1.2, DESIGN §5, §7).

The UNet's cross-attention layers (``attn2`` of every transformer block) are grouped the way TokenCompose
names them: ``{down|mid|up}_{res}`` where ``res = 64 / 2**level`` is SD1.4's latent resolution at 512 px
(``down_64, down_32, down_16, mid_8, up_16, up_32, up_64``). The names stay the same on models with other
latent sizes: on the tiny model (latent 16), ``up_64`` is its 16x16 level; :meth:`AttentionStore.resolution`
gives the actual size.

Chosen layers get a :class:`CaptureProcessor` that computes the attention probabilities explicitly
(``attn.get_attention_scores``: scaled softmax over keys) and hands them, with their autograd history, to an
:class:`AttentionStore`; every other layer runs SDPA (``AttnProcessor2_0``). The output equals the
all-SDPA output to float rounding, so capture changes nothing but memory and speed.

Usage::

    with capturing(unet, ["mid_8", "up_16", "up_32", "up_64"]) as store:
        store.reset()
        unet(latents, t, text_embeddings)
        maps = store.maps["up_64"]          # list of (batch, heads, H*W, tokens), one per layer

With non-reentrant gradient checkpointing the backward pass re-runs the forward of each checkpointed
block, which calls the processors again; wrap the backward in :meth:`AttentionStore.paused` so the
recomputed maps are not stored a second time.
"""

from __future__ import annotations

import logging
import math
import re
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from pipeline.config import ConfigError
from pipeline.names import GROUP_ORDER

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


def _level(name: str, num_levels: int) -> tuple[str, int] | None:
    """(place, level) of the block that holds processor ``name``; ``None`` outside down/mid/up blocks."""
    m = _NAME.match(name)
    if m is None:
        return None
    if m.group(3):
        return "mid", num_levels - 1
    index = int(m.group(2))
    return ("down", index) if m.group(1) == "down_blocks" else ("up", num_levels - 1 - index)


def group_name(place: str, level: int) -> str:
    """TokenCompose's group name for a UNet level: ``f"{place}_{64 // 2**level}"`` (SD1.4 at 512 px)."""
    return f"{place}_{64 // 2**level}"


def processor_group(name: str, num_levels: int) -> str:
    """Group name (``up_64``, ...) of any attention processor ``name`` in a UNet with ``num_levels`` levels."""
    found = _level(name, num_levels)
    if found is None:
        raise ValueError(f"attention processor {name!r} is outside down/mid/up blocks")
    return group_name(*found)


def cross_attention_groups(unet: torch.nn.Module) -> dict[str, list[str]]:
    """Group name -> processor names (keys of ``unet.attn_processors``) of its cross-attention layers.

    Layers are listed in call order. For SD1.4: ``down_64``, ``down_32``, ``down_16`` have 2 layers each,
    ``mid_8`` 1, ``up_16``, ``up_32``, ``up_64`` 3 each (16 in all). Self-attention (``attn1``) layers are
    not listed.
    """
    num_levels = len(unet.down_blocks)
    groups: dict[str, list[str]] = {}
    for name in unet.attn_processors:
        if ".attn2." in name:
            groups.setdefault(processor_group(name, num_levels), []).append(name)
    return {g: groups[g] for g in sorted(groups, key=_group_sort_key)}


def _group_sort_key(group: str) -> int:
    return GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)


class AttentionStore:
    """Attention probabilities captured during UNet forwards.

    Attributes:
        maps: group -> list of tensors, one per captured call in call order, each
            (batch, heads, H*W, keys) with the probabilities (softmax over keys, keys = 77 text tokens for
            cross-attention), keeping autograd history unless ``detach=True``.
        groups: group -> processor names captured in that group.
        enabled: when False, processors compute attention but store nothing (see :meth:`paused`).
    """

    def __init__(self, groups: dict[str, list[str]], sample_size: int, detach: bool = False):
        self.groups = {g: list(names) for g, names in groups.items()}
        self.sample_size = int(sample_size)
        self.detach = detach
        self.enabled = True
        self.maps: dict[str, list[torch.Tensor]] = {g: [] for g in self.groups}
        # every group has an entry from the start (its size at the configured latent), so capturing never
        # adds keys: a compiled UNet would otherwise recompile once the dict stops being empty
        self._seen_res: dict[str, int] = {g: self._config_resolution(g) for g in self.groups}

    def reset(self) -> None:
        """Drop every stored map (call at the start of each UNet forward whose maps you want)."""
        self.maps = {g: [] for g in self.groups}

    @contextmanager
    def paused(self) -> Iterator["AttentionStore"]:
        """Store nothing inside the block (e.g. the backward pass that recomputes checkpointed blocks)."""
        previous, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = previous

    def add(self, group: str, probs: torch.Tensor) -> None:
        """Store ``probs`` (batch, heads, H*W, keys) under ``group``."""
        if not self.enabled:
            return
        self._seen_res[group] = side_of(probs.shape[2], f"{group} (capture needs square latents)")
        self.maps[group].append(probs.detach() if self.detach else probs)

    def resolution(self, group: str) -> int:
        """Actual H (= W) of ``group``'s maps in this model: the last captured size, else from the config."""
        return self._seen_res[group] if group in self._seen_res else self._config_resolution(group)

    def _config_resolution(self, group: str) -> int:
        """``group``'s map size at the configured latent size (``sample_size`` / 2**level)."""
        res = int(group.rsplit("_", 1)[1])  # "up_64" -> 64
        level = int(math.log2(64 // res))
        return self.sample_size // 2**level


class CaptureProcessor:
    """Attention with explicit probabilities (``attn.get_attention_scores``) handed to a store.

    Same computation as diffusers' ``AttnProcessor`` (q/k/v projections, per-head softmax over keys,
    weighted sum of values, output projection, residual and rescale); the probabilities, reshaped to
    (batch, heads, queries, keys), go to ``store.add(group, probs)`` before they multiply the values.
    """

    def __init__(self, store: AttentionStore, group: str):
        self.store = store
        self.group = group

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, queries, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        self.store.add(self.group, probs.view(batch, attn.heads, queries, probs.shape[-1]))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


GROUP_NAMING = "{down|mid|up}_{64,32,16,8}: the block and its latent side for SD1.4 at 512 px"
_GROUP = re.compile(r"(down|mid|up)_\d+")


def side_of(num_queries: int, what: str = "attention map") -> int:
    """The side ``h`` of a square map with ``h*h == num_queries``; ``ValueError`` naming ``what`` otherwise."""
    side = math.isqrt(num_queries)
    if side * side != num_queries:
        raise ValueError(f"{what}: {num_queries} query positions do not form a square map (height == width)")
    return side


def check_group_names(names: Iterable[str]) -> None:
    """Raise ``ValueError`` for a name that cannot be a cross-attention group (a params check: the
    UNet's own groups are checked when capture is installed)."""
    bad = [n for n in names if not (isinstance(n, str) and _GROUP.fullmatch(n))]
    if bad:
        raise ValueError(f"unknown cross-attention group name(s) {bad}; names are {GROUP_NAMING}, "
                         f"e.g. [mid_8, up_16, up_32, up_64]")


def _check_groups(available: dict[str, list[str]], wanted: Iterable[str]) -> list[str]:
    wanted = list(dict.fromkeys(wanted))
    unknown = [g for g in wanted if g not in available]
    if unknown:
        raise ConfigError(f"cross-attention group(s) {unknown} are not in this UNet, which has "
                          f"{list(available)} (names are {GROUP_NAMING})")
    return wanted


def capture_cross_attention(unet: torch.nn.Module, groups: Iterable[str], detach: bool = False) -> AttentionStore:
    """Install capture processors on the cross-attention layers of ``groups``; SDPA everywhere else.

    Returns the :class:`AttentionStore` the processors fill. ``detach=True`` stores maps without autograd
    history (figures). Raises ``ValueError`` naming the available groups for an unknown name.
    """
    available = cross_attention_groups(unet)
    chosen = _check_groups(available, groups)
    store = AttentionStore({g: available[g] for g in chosen}, unet.config.sample_size, detach=detach)
    captured = {name: g for g in chosen for name in available[g]}
    processors = {name: CaptureProcessor(store, captured[name]) if name in captured else AttnProcessor2_0()
                  for name in unet.attn_processors}
    unet.set_attn_processor(processors)
    log.debug("capturing %d cross-attention layers in groups %s", len(captured), chosen)
    return store


def restore_attention(unet: torch.nn.Module) -> None:
    """Put SDPA (``AttnProcessor2_0``) back on every attention layer."""
    unet.set_attn_processor({name: AttnProcessor2_0() for name in unet.attn_processors})


@contextmanager
def capturing(unet: torch.nn.Module, groups: Iterable[str], detach: bool = False) -> Iterator[AttentionStore]:
    """Context manager: :func:`capture_cross_attention` on entry, :func:`restore_attention` on exit."""
    store = capture_cross_attention(unet, groups, detach=detach)
    try:
        yield store
    finally:
        restore_attention(unet)


def mask_ratios(cols: torch.Tensor, masks_small: torch.Tensor) -> torch.Tensor:
    """Share of each sub-token's attention inside its word's mask, per layer and head.

    Args:
        cols: (L, B, h, P, W, S) token columns from :func:`gather_token_maps`.
        masks_small: (B, W, P) binary masks at the maps' resolution.
    Returns:
        (L, B, h, W, S) ratios Σ_p A·M / Σ_p A (no epsilon, as in the original).
    """
    inside = torch.einsum("lbhpws,bwp->lbhws", cols, masks_small)
    return inside / cols.sum(dim=3)
