"""The demo vision transformer: a small torchvision ``VisionTransformer`` for 64x64 RGB input.

A hybrid ViT (as ViT-R50 in Dosovitskiy et al.): the patch embedding ``conv_proj`` is a small convolutional
stem (the demo CNN's feature layout: six conv-BN-ReLU blocks, three max-pools, then a 1x1 projection) that
turns the image into an 8x8 grid of 64-dimensional tokens; then the class token, position embedding and 4
encoder layers of 4 heads (hidden size 64, MLP size 128) of torchvision's own class, so that lrpcli explains
it the way it explains ``vit_b_16`` (``canonizers: [transformer]``, composite ``attn_lrp`` or ``cp_lrp``). A plain
linear patch embedding did not learn the shapes from a few thousand images (see ``README.md``). Inputs are
normalised outside the model as for the demo CNN (mean 0.5, std 0.25 per channel).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

IMAGE_SIZE = 64
PATCH_SIZE = 8  # the stem's stride: 64 / 8 = an 8x8 grid of tokens
HIDDEN = 64


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


def stem() -> nn.Sequential:
    """Image -> N x 64 x 8 x 8 tokens: ``features`` has the demo CNN's layout (so its trained weights can
    initialise it), ``proj`` is the 1x1 token projection."""
    features = nn.Sequential(*_block(3, 16), *_block(16, 16), nn.MaxPool2d(2), *_block(16, 32), *_block(32, 32),
                             nn.MaxPool2d(2), *_block(32, 64), nn.MaxPool2d(2), *_block(64, 64))
    return nn.Sequential(OrderedDict(features=features, proj=nn.Conv2d(64, HIDDEN, kernel_size=1)))


def build(num_classes: int = 4) -> VisionTransformer:
    """The untrained demo ViT; load ``share/demo/vit.pt`` (a float16 state_dict) into it for the trained
    weights (``load_state_dict`` casts them to the model's float32)."""
    model = VisionTransformer(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_layers=4, num_heads=4,
                              hidden_dim=HIDDEN, mlp_dim=128, num_classes=num_classes)
    model.conv_proj = stem()
    return model
