"""Grounding losses: SPEC §1.7 worked example and a loop-per-word reference of SPEC §1.4."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resize

from pipeline.training.losses import GroundingTargets, grounding_loss, resize_masks


def worked_example_maps(n_layers: int) -> dict[str, list[torch.Tensor]]:
    """SPEC §1.7: res 2, two heads, the word's token at position 1 of 3 keys."""
    head1 = torch.tensor([0.20, 0.10, 0.05, 0.05])
    head2 = torch.tensor([0.10, 0.10, 0.10, 0.10])
    maps = torch.zeros(1, 2, 4, 3)
    maps[0, 0, :, 1], maps[0, 1, :, 1] = head1, head2
    maps[..., 0] = 1 - maps[..., 1]
    return {"up_64": [maps.clone() for _ in range(n_layers)]}


def worked_example_targets() -> GroundingTargets:
    return GroundingTargets.from_lists([[torch.tensor([[1.0, 0.0], [0.0, 0.0]])]], [[[1]]], resolution=2)


def test_worked_example_token_loss_per_layer():
    out = grounding_loss(worked_example_maps(1), worked_example_targets(), ["up_64"])
    assert out.token.item() == pytest.approx(0.390625, abs=1e-7)


def test_worked_example_layers_are_summed_not_averaged():
    out = grounding_loss(worked_example_maps(3), worked_example_targets(), ["up_64"])
    assert out.token.item() == pytest.approx(3 * 0.390625, abs=1e-6)


def test_worked_example_pixel_loss():
    out = grounding_loss(worked_example_maps(3), worked_example_targets(), ["up_64"])
    expected = np.mean([-math.log(0.15), -math.log(0.90), -math.log(0.925), -math.log(0.925)])
    assert out.pixel.item() == pytest.approx(expected, abs=1e-6)
    assert out.pixel.item() == pytest.approx(0.540, abs=1e-3)


def test_resize_masks_matches_torchvision_without_antialias():
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(2, 3, 64, 64, generator=gen) > 0.93).float()
    ours = resize_masks(masks, 8).view(2, 3, 8, 8)
    ref = resize(masks, [8, 8], interpolation=InterpolationMode.BILINEAR, antialias=False) > 0
    assert torch.equal(ours.bool(), ref)
    fat = resize(masks, [8, 8], interpolation=InterpolationMode.BILINEAR, antialias=True) > 0
    assert fat.sum() > ref.sum()  # antialias=True would dilate: the pin matters


# ----------------------------------------------------------------------------- loop reference

def reference_losses(maps, masks, token_ids, groups):
    """Plain per-sample, per-word, per-head loops of SPEC §1.4 (batch mean, zero for wordless samples)."""
    batch = len(masks)
    token_total, pixel_total = 0.0, 0.0
    for b in range(batch):
        if not masks[b]:
            continue
        for group in groups:
            layers = [m[b].double() for m in maps[group]]  # each (h, P, K)
            res = int(round(layers[0].shape[1] ** 0.5))
            tok, pix = 0.0, 0.0
            for mask, ids in zip(masks[b], token_ids[b]):
                small = resize(mask[None, None].float(), [res, res], antialias=False,
                               interpolation=InterpolationMode.BILINEAR)[0, 0] > 0
                small = small.flatten().double()
                for layer in layers:
                    sub = 0.0
                    for s in ids:
                        ratios = [(layer[n, :, s] * small).sum() / layer[n, :, s].sum() for n in range(layer.shape[0])]
                        sub += (1 - sum(ratios) / len(ratios)) ** 2
                    tok += sub / len(ids)
                avg = sum(layer.mean(0) for layer in layers) / len(layers)
                prob = sum(avg[:, s] for s in ids)
                pix += F.binary_cross_entropy(prob.clamp(0, 1), small).item()
            token_total += float(tok) / len(masks[b])
            pixel_total += pix / len(masks[b])
    return token_total / batch, pixel_total / batch


def random_case(seed: int, heads: int = 4, keys: int = 77):
    gen = torch.Generator().manual_seed(seed)
    layout = {"mid_8": (1, 2), "up_16": (3, 4), "up_64": (3, 8)}  # group -> (layers, res)
    word_counts = [3, 0, 2, 1]  # sample 1 has no aligned mask
    batch, full = len(word_counts), 16
    maps = {g: [torch.softmax(3 * torch.randn(batch, heads, r * r, keys, generator=gen), -1) for _ in range(n)]
            for g, (n, r) in layout.items()}
    masks, token_ids = [], []
    for n in word_counts:
        sample_masks, sample_ids = [], []
        for w in range(n):
            m = torch.zeros(full, full)
            if w != 1:  # word 1 of each sample has an empty mask
                y, x = torch.randint(0, full - 4, (2,), generator=gen).tolist()
                m[y : y + 1 + w * 3, x : x + 5] = 1
            sample_masks.append(m)
            start = int(torch.randint(1, 60, (1,), generator=gen))
            sample_ids.append(list(range(start, start + 1 + (w % 3))))  # 1-3 sub-tokens
        masks.append(sample_masks)
        token_ids.append(sample_ids)
    return maps, masks, token_ids, list(layout)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_equals_loop_reference(seed):
    maps, masks, token_ids, groups = random_case(seed)
    targets = GroundingTargets.from_lists(masks, token_ids, resolution=16)
    out = grounding_loss(maps, targets, groups)
    ref_token, ref_pixel = reference_losses(maps, masks, token_ids, groups)
    assert out.token.item() == pytest.approx(ref_token, rel=1e-5)
    assert out.pixel.item() == pytest.approx(ref_pixel, rel=1e-5)
    assert set(out.token_by_group) == set(groups)


def test_batch_loss_is_mean_of_single_sample_losses():
    maps, masks, token_ids, groups = random_case(3)
    full = grounding_loss(maps, GroundingTargets.from_lists(masks, token_ids, 16), groups)
    singles = []
    for b in range(len(masks)):
        one = {g: [m[b : b + 1] for m in layers] for g, layers in maps.items()}
        singles.append(grounding_loss(one, GroundingTargets.from_lists([masks[b]], [token_ids[b]], 16), groups))
    assert full.token.item() == pytest.approx(np.mean([s.token.item() for s in singles]), rel=1e-6)
    assert full.pixel.item() == pytest.approx(np.mean([s.pixel.item() for s in singles]), rel=1e-6)


def test_samples_without_words_give_zero_loss_and_no_nan():
    maps, _, _, groups = random_case(4)
    maps = {g: [m[:2].requires_grad_() for m in layers] for g, layers in maps.items()}
    out = grounding_loss(maps, GroundingTargets.from_lists([[], []], [[], []], 16), groups)
    assert out.token.item() == 0.0 and out.pixel.item() == 0.0
    (out.token + out.pixel).backward()
    grads = [m.grad for layers in maps.values() for m in layers]
    assert all(g is not None and torch.all(g == 0) for g in grads)


def test_gradient_flows_only_to_word_token_columns():
    maps, masks, token_ids, groups = random_case(5)
    maps = {g: [m.requires_grad_() for m in layers] for g, layers in maps.items()}
    out = grounding_loss(maps, GroundingTargets.from_lists(masks, token_ids, 16), groups)
    (out.token + out.pixel).backward()
    grad = maps["up_64"][0].grad
    used = {s for ids in token_ids[0] for s in ids}
    unused = [k for k in range(77) if k not in used]
    assert grad[0][..., sorted(used)].abs().sum() > 0
    assert torch.all(grad[0][..., unused] == 0)
    assert torch.all(grad[1] == 0)  # the sample without words


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="mask shape"):
        GroundingTargets.from_lists([[torch.zeros(8, 8)]], [[[1]]], resolution=16)
    with pytest.raises(ValueError, match="no token positions"):
        GroundingTargets.from_lists([[torch.zeros(16, 16)]], [[[]]], resolution=16)
    maps, masks, _, groups = random_case(6)
    for token in (80, 77):                   # 77 is the first position past the context
        bad_ids = [[[token] for _ in sample] for sample in masks]
        with pytest.raises(ValueError, match="outside the 77 attention keys"):
            grounding_loss(maps, GroundingTargets.from_lists(masks, bad_ids, 16), groups)
    with pytest.raises(ValueError, match="no captured maps"):
        grounding_loss({}, GroundingTargets.from_lists(masks, [[[1]] * len(s) for s in masks], 16), ["up_64"])
