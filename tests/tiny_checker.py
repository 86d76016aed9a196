"""A tiny, randomly initialised safety checker saved as a pipeline's checker folders, for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The checker scores an image by the cosine between its embedding and each concept's, minus that
# concept's threshold, and flags it when a score is above 0. A cosine lies in [-1, 1], so these
# thresholds make the verdict the same for every image, whatever the random weights.
FLAG_ALL_THRESHOLD = -2.0
FLAG_NONE_THRESHOLD = 2.0
# A fixed seed, so every build of the checker holds the same weights.
TINY_CHECKER_SEED = 20221123
# The side the processor crops to, which the vision tower's image_size must match.
TINY_CHECKER_SIDE = 32


def tiny_checker_parts(flag_everything: bool) -> tuple[Any, Any]:
    """A tiny StableDiffusionSafetyChecker (eval mode) and its CLIPImageProcessorPil."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessorPil

    torch.manual_seed(TINY_CHECKER_SEED)
    config = CLIPConfig(
        # The checker never builds the text tower; CLIPConfig needs one all the same.
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": TINY_CHECKER_SIDE,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    model = StableDiffusionSafetyChecker(config).eval()
    # Random concept embeddings, so a test that sets its own thresholds sees different scores per concept.
    model.concept_embeds.data.normal_()
    model.special_care_embeds.data.normal_()
    threshold = FLAG_ALL_THRESHOLD if flag_everything else FLAG_NONE_THRESHOLD
    model.concept_embeds_weights.data.fill_(threshold)
    model.special_care_embeds_weights.data.fill_(threshold)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_CHECKER_SIDE}, crop_size={"height": TINY_CHECKER_SIDE, "width": TINY_CHECKER_SIDE}
    )
    return model, processor


def build_tiny_checker(folder: Path, flag_everything: bool) -> Path:
    """Save a checker that flags every image (or none) as folder/safety_checker + folder/feature_extractor."""
    model, processor = tiny_checker_parts(flag_everything)
    folder = Path(folder)
    model.save_pretrained(folder / "safety_checker")
    processor.save_pretrained(folder / "feature_extractor")
    return folder


def add_checker_to_pipeline(pipeline: Path, flag_everything: bool) -> Path:
    """Give a diffusers pipeline folder its own tiny checker, registered in model_index.json as SD's is."""
    index_file = Path(pipeline) / "model_index.json"
    index = json.loads(index_file.read_text())
    build_tiny_checker(pipeline, flag_everything)
    # The entries Stable Diffusion 1.x's model_index.json gives its checker (the tiny preset has [null, null]).
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index_file.write_text(json.dumps(index, indent=2))
    return Path(pipeline)
