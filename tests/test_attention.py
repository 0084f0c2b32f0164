"""Cross-attention capture: grouping, fidelity to SDPA, gradients, checkpointing, CFG batches."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from pipeline.attention import (CaptureProcessor, capture_cross_attention, capturing, cross_attention_groups,
                                restore_attention)
from pipeline.training.losses import GroundingTargets, grounding_loss
from pipeline.zoo.sd import TINY_UNET

PAPER_GROUPS = ["mid_8", "up_16", "up_32", "up_64"]
SD14_LAYOUT = {"down_64": 2, "down_32": 2, "down_16": 2, "mid_8": 1, "up_16": 3, "up_32": 3, "up_64": 3}


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).eval()


def unet_inputs(unet, batch: int, latent: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=gen)
    t = torch.tensor([500] * batch)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)
    return x, t, ctx


def test_groups_follow_sd14_layout(tiny_unet):
    groups = cross_attention_groups(tiny_unet)
    assert {g: len(n) for g, n in groups.items()} == SD14_LAYOUT
    assert all(".attn2." in n for names in groups.values() for n in names)
    assert groups["up_64"][0].startswith("up_blocks.3.attentions.0")
    assert groups["mid_8"] == ["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    assert groups["down_16"][1].startswith("down_blocks.2.attentions.1")


def test_capture_covers_exactly_the_configured_layers(tiny_unet):
    groups = cross_attention_groups(tiny_unet)
    with capturing(tiny_unet, ["up_16", "mid_8"]) as store:
        procs = tiny_unet.attn_processors
        captured = {n for n, p in procs.items() if isinstance(p, CaptureProcessor)}
        assert captured == set(groups["up_16"]) | set(groups["mid_8"])
        assert all(isinstance(p, AttnProcessor2_0) for n, p in procs.items() if n not in captured)
        with torch.no_grad():
            tiny_unet(*unet_inputs(tiny_unet, 1, 16))
        assert set(store.maps) == {"up_16", "mid_8"}
        assert [len(store.maps["up_16"]), len(store.maps["mid_8"])] == [3, 1]
        assert store.resolution("up_16") == 4 and store.resolution("mid_8") == 2
    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_unet.attn_processors.values())


def test_paused_blocks_nest_and_restore_the_previous_state():
    """A pause inside a pause, or on a store already off, must not switch capture back on when it ends."""
    from pipeline.attention import AttentionStore

    store = AttentionStore({}, sample_size=64)
    with store.paused():
        with store.paused():
            pass
        assert not store.enabled
    assert store.enabled
    store.enabled = False
    with store.paused():
        pass
    assert not store.enabled


def test_unknown_group_is_refused(tiny_unet):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"group\(s\) \['up_128'\] are not in this UNet"):
        capture_cross_attention(tiny_unet, ["up_128"])


def check_fidelity_and_gradients(unet, latent: int, groups: list[str], atol: float = 1e-5):
    """Captured output == SDPA output; maps are softmaxes; grounding gradients reach to_q/to_k."""
    x, t, ctx = unet_inputs(unet, 2, latent)
    restore_attention(unet)
    with torch.no_grad():
        reference = unet(x, t, ctx).sample
    store = capture_cross_attention(unet, groups)
    try:
        out = unet(x, t, ctx).sample
        torch.testing.assert_close(out, reference, atol=atol, rtol=0)
        for g in groups:
            for m in store.maps[g]:
                side = store.resolution(g)
                assert m.shape == (2, 8, side * side, 77)  # SD1.x: 8 heads in every layer
                assert m.requires_grad
                torch.testing.assert_close(m.sum(-1), torch.ones_like(m[..., 0]))
        masks = [[torch.zeros(latent * 8, latent * 8)], [torch.zeros(latent * 8, latent * 8)]]
        masks[0][0][:40, :40] = 1
        masks[1][0][8:, 16:] = 1
        targets = GroundingTargets.from_lists(masks, [[[2, 3]], [[5]]], resolution=latent * 8)
        loss = grounding_loss(store.maps, targets, groups)
        unet.zero_grad()
        (loss.token + loss.pixel).backward()
    finally:
        restore_attention(unet)
    names = cross_attention_groups(unet)
    modules = dict(unet.named_modules())
    for g in groups:
        for name in names[g]:
            attn = modules[name.removesuffix(".processor")]
            assert attn.to_q.weight.grad is not None and attn.to_q.weight.grad.abs().sum() > 0
            assert attn.to_k.weight.grad.abs().sum() > 0
    assert unet.conv_in.weight.grad.abs().sum() > 0  # the grounding gradient reaches the UNet's input


def test_tiny_capture_matches_sdpa_and_backpropagates(tiny_unet):
    check_fidelity_and_gradients(tiny_unet, 16, PAPER_GROUPS)


def test_capture_under_cfg_batch(tiny_unet):
    """A CFG batch (unconditional + conditional) keeps the per-sample split of the maps."""
    x, t, ctx = unet_inputs(tiny_unet, 1, 16)
    with capturing(tiny_unet, ["up_64"], detach=True) as store, torch.no_grad():
        tiny_unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.zeros_like(ctx), ctx]))
        pair = store.maps["up_64"][0]
        store.reset()
        tiny_unet(x, t, ctx)
        single = store.maps["up_64"][0]
    assert not pair.requires_grad
    torch.testing.assert_close(pair[1:], single, atol=1e-5, rtol=0)
    assert not torch.allclose(pair[0], pair[1])


def test_gradient_checkpointing_keeps_map_gradients(tiny_unet):
    """Non-reentrant checkpointing: maps carry grad, and gradients equal the plain run's."""
    x, t, ctx = unet_inputs(tiny_unet, 2, 16, seed=1)
    targets = GroundingTargets.from_lists([[torch.ones(128, 128).tril()], []], [[[4]], []], resolution=128)
    grads = []
    for checkpointing in (False, True):
        tiny_unet.train()
        if checkpointing:
            tiny_unet.enable_gradient_checkpointing()
        tiny_unet.zero_grad()
        with capturing(tiny_unet, PAPER_GROUPS) as store:
            out = tiny_unet(x, t, ctx).sample
            assert all(m.requires_grad for maps in store.maps.values() for m in maps)
            loss = grounding_loss(store.maps, targets, PAPER_GROUPS)
            store.reset()
            with store.paused():
                (out.square().mean() + loss.token + loss.pixel).backward()
            assert all(not maps for maps in store.maps.values())  # recomputation stored nothing
        grads.append(torch.cat([p.grad.flatten() for p in tiny_unet.parameters()]))
        tiny_unet.disable_gradient_checkpointing()
        tiny_unet.eval()
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_sd14_architecture_capture_matches_sdpa_and_backpropagates():
    """The real SD1.4 UNet (random weights) at a 32x32 latent: grouping, fidelity, gradients."""
    from pipeline.zoo.sd import build_sd14_unet

    unet = build_sd14_unet(seed=0).eval()
    assert {g: len(n) for g, n in cross_attention_groups(unet).items()} == SD14_LAYOUT
    assert len(unet.attn_processors) == 32
    check_fidelity_and_gradients(unet, 32, PAPER_GROUPS)
