"""What the frozen image encoder carries: a linear probe of its features for each attribute the captions name.

BLIP-2 can only pass on what the frozen encoder saw: if an attribute cannot be read from the features, neither arm of
the ablation can name it, and stage 1 has nothing to add there. The probe makes that visible in the report: per
attribute, the held-out accuracy of a logistic regression on the mean of the encoder's output tokens, next to the
majority rate (what always answering the more frequent value scores).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .world import COLORS, SHAPES


def attribute_labels(scenes: Sequence[Sequence[dict]]) -> tuple[list[str], torch.Tensor]:
    """Binary attributes of each scene (its groups as `asdict(Group)`): per shape, "there is one", "one on the
    left", "a large one", "two or more"; per color, "there is one". Returns the names and a float `[N, A]` tensor."""
    tests = []
    for shape in SHAPES:
        tests += [
            (f"a {shape}", lambda g, s=shape: g["shape"] == s),
            (f"a {shape} on the left", lambda g, s=shape: g["shape"] == s and g["side"] == "left"),
            (f"a large {shape}", lambda g, s=shape: g["shape"] == s and g["size"] == "large"),
            (f"two or more {shape}s", lambda g, s=shape: g["shape"] == s and g["count"] >= 2),
        ]
    tests += [(f"something {color}", lambda g, c=color: g["color"] == c) for color in COLORS]
    labels = [[float(any(test(group) for group in scene)) for _, test in tests] for scene in scenes]
    return [name for name, _ in tests], torch.tensor(labels)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    steps: int = 300,
    learning_rate: float = 1e-2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One logistic regression per label column (full-batch Adam on standardized features).

    Args:
        train_features / test_features: `[N, D]` / `[M, D]`.
        train_labels / test_labels: `[N, A]` / `[M, A]`, 0 or 1.

    Returns:
        `(accuracy [A], majority [A])` on the test set, fractions: the probe's, and that of always answering the
        value more frequent in the test labels.
    """
    mean, std = train_features.mean(0), train_features.std(0) + 1e-5
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    weight = torch.zeros(x_train.shape[1], train_labels.shape[1], requires_grad=True)
    bias = torch.zeros(train_labels.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=learning_rate, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(x_train @ weight + bias, train_labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = (x_test @ weight + bias > 0).float()
    accuracy = (predicted == test_labels).float().mean(0)
    positive = test_labels.mean(0)
    return accuracy, torch.maximum(positive, 1 - positive)


@torch.no_grad()  # not inference_mode: the probe's autograd must be allowed to save these features
def mean_features(vision: torch.nn.Module, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """`[N, D]`: the mean over the encoder's output tokens (after `post_layernorm`) of each image."""
    vision.eval()
    return torch.cat(
        [vision(pixel_values=batch).last_hidden_state.mean(1) for batch in pixel_values.split(batch_size)]
    )


def probe_image_encoder(
    vision: torch.nn.Module,
    train_pixels: torch.Tensor,
    train_scenes: Sequence[Sequence[dict]],
    test_pixels: torch.Tensor,
    test_scenes: Sequence[Sequence[dict]],
) -> dict[str, dict[str, float]]:
    """`{attribute: {"accuracy": %, "majority": %}}` of a linear probe trained on the training images' features
    and scored on the test images'."""
    names, train_labels = attribute_labels(train_scenes)
    _, test_labels = attribute_labels(test_scenes)
    accuracy, majority = linear_probe(
        mean_features(vision, train_pixels), train_labels, mean_features(vision, test_pixels), test_labels
    )
    return {
        name: {"accuracy": 100 * acc, "majority": 100 * maj}
        for name, acc, maj in zip(names, accuracy.tolist(), majority.tolist())
    }
