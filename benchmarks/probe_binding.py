"""Where the demo's BLIP-2 keeps, or loses, which attribute belongs to which group.

    python benchmarks/probe_binding.py blip2_demo          # a folder `blip2-hf demo` wrote (seed 0's checkpoints)

On the demo world's two-group scenes (the first 2,000 training images, every test image), a linear read-out (softmax
regression, 300 full-batch Adam steps on standardized features) of each group's attributes named by its side ("the
color of the group on the left"), from five representations of the same images:

    encoder mean        the mean of the frozen encoder's output tokens (what the demo's probe table reads)
    encoder tokens      all of its tokens, concatenated
    stage-1 queries     the Q-Former's query outputs after stage 1 (`runs/seed0/stage1`), concatenated
    soft prompt         the LLM's input from the queries (`get_image_features`) after stage 2, both arms

A representation that names every attribute (the probe table) but not which group has it reads high on shapes and low
on "left color". Prints one row per representation, accuracies (%) on the test images; about 2.5 minutes on 2
cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from blip2_hf.demo.world import COLORS, SHAPES, SIZES
from blip2_hf.modeling_blip2 import Blip2ForConditionalGeneration, Blip2ForPreTraining, Blip2VisionModel
from blip2_hf.processing_blip2 import Blip2Processor


def two_group_split(demo: Path, split: str, limit: int) -> tuple[list[dict], list[Image.Image]]:
    records = json.loads((demo / "data" / split / "annotations.json").read_text())
    records = [record for record in records if len(record["scene"]) == 2][:limit]
    return records, [Image.open(demo / "data" / split / record["image"]).convert("RGB") for record in records]


def side_labels(records: list[dict]) -> dict[str, torch.Tensor]:
    """`{"left color": [N], ...}`: class indices of each side's group's color, shape, size and count."""
    labels = {}
    for side in ("left", "right"):
        groups = [next(group for group in record["scene"] if group["side"] == side) for record in records]
        labels[f"{side} color"] = torch.tensor([list(COLORS).index(group["color"]) for group in groups])
        labels[f"{side} shape"] = torch.tensor([SHAPES.index(group["shape"]) for group in groups])
        labels[f"{side} size"] = torch.tensor([list(SIZES).index(group["size"]) for group in groups])
        labels[f"{side} count"] = torch.tensor([group["count"] - 1 for group in groups])
    return labels


def read_out(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor) -> float:
    """Held-out accuracy (%) of a softmax regression from `train [N, D]` to `train_labels [N]`."""
    mean, std = train.mean(0), train.std(0) + 1e-5
    train, test = (train - mean) / std, (test - mean) / std
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    linear = torch.nn.Linear(train.shape[1], classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        loss = F.cross_entropy(linear(train), train_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return 100 * (linear(test).argmax(1) == test_labels).float().mean().item()


@torch.no_grad()
def representations(demo: Path, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """`{name: [N, D]}` for the five representations of the module docstring."""
    vision = Blip2VisionModel.from_pretrained(demo / "pretrained" / "vision_encoder").eval()
    tokens = torch.cat([vision(pixel_values=batch).last_hidden_state for batch in pixel_values.split(256)])
    features = {"encoder mean": tokens.mean(1), "encoder tokens": tokens.flatten(1)}
    stage1 = Blip2ForPreTraining.from_pretrained(demo / "runs" / "seed0" / "stage1").eval()
    queries = []
    for batch in pixel_values.split(256):
        image_embeds = stage1.vision_model(pixel_values=batch).last_hidden_state
        query_output = stage1.qformer(
            query_embeds=stage1.query_tokens.expand(len(batch), -1, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
        ).last_hidden_state
        queries.append(query_output.flatten(1))
    features["stage-1 queries"] = torch.cat(queries)
    for name, folder in (("soft prompt, BLIP-2", "stage2"), ("soft prompt, stage 2 alone", "stage2_without_stage1")):
        model = Blip2ForConditionalGeneration.from_pretrained(demo / "runs" / "seed0" / folder).eval()
        outputs = [model.get_image_features(pixel_values=batch) for batch in pixel_values.split(256)]
        features[name] = torch.cat([getattr(out, "pooler_output", out).flatten(1) for out in outputs])
    return features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo", type=Path, help="a folder `blip2-hf demo` wrote")
    args = parser.parse_args()
    train_records, train_images = two_group_split(args.demo, "train", 2000)
    test_records, test_images = two_group_split(args.demo, "test", 10**6)
    processor = Blip2Processor.from_pretrained(args.demo / "runs" / "seed0" / "stage1")
    pixels = processor(images=train_images + test_images, return_tensors="pt")["pixel_values"]
    train_labels, test_labels = side_labels(train_records), side_labels(test_records)
    print(f"{len(train_records)} training / {len(test_records)} test two-group images; held-out accuracy (%)")
    print(f"{'':28s}" + "".join(f"{name:>13s}" for name in train_labels))
    for name, features in representations(args.demo, pixels).items():
        train, test = features[: len(train_records)], features[len(train_records) :]
        scores = [read_out(train, train_labels[key], test, test_labels[key]) for key in train_labels]
        print(f"{name:28s}" + "".join(f"{score:13.1f}" for score in scores), flush=True)


if __name__ == "__main__":
    main()
