"""Embedded Grounded-SAM models: a tiny Grounding DINO and a tiny SAM (random weights, seeded).

* ``tiny-grounding-dino``: ``GroundingDinoForObjectDetection`` + ``GroundingDinoProcessor`` folder. Swin
  backbone (embed 16, one block per stage), a one-layer BERT text encoder, d_model 32, one encoder layer,
  two decoder layers (the model needs >= 2), 16 queries; images resized to shorter side 128 (longer <= 213,
  the 800/1333 ratio of the real processor). The text tokenizer is a BERT WordPiece tokenizer built
  offline from :func:`bert_vocab`: the special tokens sit at BERT's ids ([PAD] 0, [UNK] 100, [CLS] 101,
  [SEP] 102, [MASK] 103, "." 1012, "?" 1029 — Grounding DINO hard-codes 101/102/1012/1029 to split the
  prompt into phrases), single characters and ``##`` continuations make every ASCII word tokenizable, and
  common object words (COCO categories, the demo nouns) are whole tokens.
  Logit calibration: with random weights every query scores every token near 0 or 1, so boxes would span
  the whole prompt. The builder sets the two layer norms whose outputs meet in the contrastive head (the
  decoder's final norm and the last text-enhancer norm) to small gains and opposite biases along one axis,
  which shifts the box-token logits to about N(-2.5, 1): at the paper thresholds (0.25 / 0.25) a box then
  lights up a few tokens, so the demo yields a deterministic mix of detections and misses.
* ``tiny-sam``: ``SamModel`` + ``SamProcessor`` folder: 128 px input, 16 px patches (8x8 embeddings),
  width 32, two ViT layers; ``SamVisionConfig.num_pos_feats`` is half the prompt-encoder width, as the
  model requires.

:func:`real_grounding_dino_config` / :func:`real_sam_hq_config` give the paper architectures (Grounding DINO
Swin-T OGC = ``IDEA-Research/grounding-dino-tiny``; SAM-HQ ViT-H) for benchmarks with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.zoo import register

BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
BERT_BASE_VOCAB_SIZE = 30522  # bert-base-uncased, the text encoder of Grounding DINO
MAX_TEXT_LEN = 256

# Whole-word tokens: COCO category words and the demo's nouns (others split into characters).
OBJECT_WORDS = """
person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign parking meter
bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee
skis snowboard sports ball kite baseball bat glove skateboard surfboard tennis racket bottle wine glass cup fork
knife spoon bowl banana apple sandwich orange broccoli carrot hot pizza donut cake chair couch potted plant bed
dining table toilet tv laptop mouse remote keyboard cell phone microwave oven toaster sink refrigerator book
clock vase scissors teddy hair drier toothbrush man woman girl boy people child plate bread street room water
grass sky tree building box house star flower balls boxes trees houses cars cups kites stars flowers boats
""".split()

TINY_SWIN = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7,
                 out_indices=[2, 3, 4], image_size=128)
TINY_BERT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=MAX_TEXT_LEN)
TINY_DINO = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                 encoder_attention_heads=2, decoder_attention_heads=2, num_queries=16, encoder_n_points=2,
                 decoder_n_points=2, max_text_len=MAX_TEXT_LEN)
TINY_DINO_SIZE = {"shortest_edge": 128, "longest_edge": 213}
CALIBRATION_GAIN, CALIBRATION_BIAS = 0.4, 1.6

TINY_SAM_WIDTH = 32
TINY_SAM_IMAGE = 128
TINY_SAM_VISION = dict(hidden_size=32, output_channels=TINY_SAM_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                       image_size=TINY_SAM_IMAGE, patch_size=16, window_size=4, global_attn_indexes=[1],
                       num_pos_feats=TINY_SAM_WIDTH // 2, mlp_dim=64)
TINY_SAM_PROMPT = dict(hidden_size=TINY_SAM_WIDTH, image_size=TINY_SAM_IMAGE, patch_size=16)
TINY_SAM_DECODER = dict(hidden_size=TINY_SAM_WIDTH, mlp_dim=64, num_attention_heads=2,
                        iou_head_hidden_dim=TINY_SAM_WIDTH)

# SAM ViT-H image encoder (facebook/sam-vit-huge; SAM-HQ ViT-H uses the same encoder).
SAM_VIT_H_VISION = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                        global_attn_indexes=[7, 15, 23, 31])


def bert_vocab(words: list[str] = OBJECT_WORDS, size: int | None = None) -> list[str]:
    """A WordPiece vocabulary (list index = token id) with BERT's special-token ids.

    Order: [PAD] at 0, ``[unusedN]`` fillers, [UNK]/[CLS]/[SEP]/[MASK] at 100-103, then punctuation,
    digits, letters, ``##`` digits/letters and ``words`` in the free slots, "." at 1012 and "?" at 1029;
    padded with fillers to ``size`` (e.g. 30522 for the bert-base layout).
    """
    content = [c for c in "!\"#$%&'()*+,-/:;<=>@[\\]^_`{|}~"]
    content += list("0123456789abcdefghijklmnopqrstuvwxyz")
    content += ["##" + c for c in "0123456789abcdefghijklmnopqrstuvwxyz"]
    content += [w for w in dict.fromkeys(words) if len(w) > 1]
    fixed = {i: tok for tok, i in BERT_SPECIAL_IDS.items()}
    total = max(size or 0, max(fixed) + 1 + len(content))
    vocab, queue, unused = [], iter(content), 0
    for i in range(total):
        if i in fixed:
            vocab.append(fixed[i])
            continue
        tok = next(queue, None) if i > 103 else None
        if tok is None:
            tok, unused = f"[unused{unused}]", unused + 1
        vocab.append(tok)
    return vocab


def bert_tokenizer(vocab: list[str]):
    """A lower-casing BERT WordPiece tokenizer over ``vocab`` (no files needed)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True,
                         model_max_length=MAX_TEXT_LEN)


def grounding_dino_processor(vocab: list[str], size: dict[str, int]):
    """``GroundingDinoProcessor`` with the offline BERT tokenizer and images resized to ``size``."""
    from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

    return GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size=size),
                                  tokenizer=bert_tokenizer(vocab))


def calibrate_contrastive_logits(model: torch.nn.Module, gain: float, bias: float) -> None:
    """Shift the box-token logits of a random ``GroundingDinoForObjectDetection`` towards negative values.

    The logits are dot products of the decoder's final layer norm output (queries) and the last text
    enhancer layer norm output (tokens); gains ``gain`` and biases ``+bias`` / ``-bias`` on axis 0 make them
    about ``-bias**2 + noise`` with noise std about ``gain**2 * sqrt(d_model)``.
    """
    query_norm = model.model.decoder.layer_norm
    text_norm = model.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after
    with torch.no_grad():
        for norm, sign in ((query_norm, 1.0), (text_norm, -1.0)):
            norm.weight.fill_(gain)
            norm.bias.zero_()
            norm.bias[0] = sign * bias


def real_grounding_dino_config():
    """Grounding DINO Swin-T OGC (``IDEA-Research/grounding-dino-tiny``): transformers' defaults, which
    are Swin-T (96, [2, 2, 6, 2]) + bert-base + 6/6 layers, d_model 256, 900 queries."""
    from transformers import GroundingDinoConfig

    return GroundingDinoConfig()


def real_sam_hq_config():
    """SAM-HQ ViT-H (``syscv-community/sam-hq-vit-huge``): ViT-H image encoder, 1024 px input."""
    from transformers import SamHQConfig

    return SamHQConfig(vision_config=SAM_VIT_H_VISION, mask_decoder_config={"vit_dim": 1280})


@register("tiny-grounding-dino", "tiny Grounding DINO (Swin + 1-layer BERT, 2 decoder layers, offline WordPiece)")
def build_tiny_grounding_dino(out_dir: Path, seed: int) -> None:
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    vocab = bert_vocab()
    config = GroundingDinoConfig(backbone_config=SwinConfig(**TINY_SWIN).to_dict(),
                                 text_config=BertConfig(vocab_size=len(vocab), **TINY_BERT).to_dict(), **TINY_DINO)
    model = GroundingDinoForObjectDetection(config).eval()
    calibrate_contrastive_logits(model, CALIBRATION_GAIN, CALIBRATION_BIAS)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    grounding_dino_processor(vocab, TINY_DINO_SIZE).save_pretrained(str(out_dir))


def sam_processor(image_size: int):
    """``SamProcessor`` for a SAM whose image encoder takes ``image_size`` px (low-res masks at 1/4)."""
    from transformers import SamImageProcessor, SamProcessor

    low = image_size // 4
    image_processor = SamImageProcessor(size={"longest_edge": image_size},
                                        pad_size={"height": image_size, "width": image_size},
                                        mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low})
    return SamProcessor(image_processor=image_processor)


@register("tiny-sam", "tiny Segment Anything (128 px ViT, width 32, box prompts)")
def build_tiny_sam(out_dir: Path, seed: int) -> None:
    from transformers import SamConfig, SamModel

    config = SamConfig(vision_config=TINY_SAM_VISION, prompt_encoder_config=TINY_SAM_PROMPT,
                       mask_decoder_config=TINY_SAM_DECODER)
    SamModel(config).eval().save_pretrained(str(out_dir), safe_serialization=True)
    sam_processor(TINY_SAM_IMAGE).save_pretrained(str(out_dir))
