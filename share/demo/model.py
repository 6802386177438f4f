"""The demo CNN: a small VGG-like network with BatchNorm for 64x64 RGB input.

Plain ``nn.Sequential`` children of standard modules (no functional activations, no in-place ops), so every
leaf module is visible to an LRP composite. Inputs are normalised outside the model with mean 0.5 and std 0.25
per channel (see ``share/demo/README.md``).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=False)]


def build(num_classes: int = 4) -> nn.Sequential:
    """The untrained demo network; load ``share/demo/model.pt`` into it for the trained weights.

    ``features`` (six conv-BN-ReLU blocks, three max-pools; receptive field 41 px), then ``classifier``
    (global average pool, flatten, linear).
    """
    features = nn.Sequential(
        *_block(3, 16),
        *_block(16, 16),
        nn.MaxPool2d(2),
        *_block(16, 32),
        *_block(32, 32),
        nn.MaxPool2d(2),
        *_block(32, 64),
        nn.MaxPool2d(2),
        *_block(64, 64),
    )
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
    return nn.Sequential(OrderedDict(features=features, classifier=classifier))
