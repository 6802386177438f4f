"""Module families, so composites name "activations" or "average pools" once."""

from __future__ import annotations

from torch import nn

from lrpcli.engine import functional_modules
from lrpcli.engine.modules import Gate, Sum


def _torchvision(*names: str) -> tuple[type, ...]:
    found = []
    try:
        from torchvision import ops
        from torchvision.ops import misc
    except Exception:  # pragma: no cover - torchvision missing or broken
        return ()
    for name in names:
        cls = getattr(ops, name, None) or getattr(misc, name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _functional(*names: str) -> tuple[type, ...]:
    return tuple(getattr(functional_modules, n) for n in names)


def _nn(*names: str) -> tuple[type, ...]:
    return tuple(getattr(nn, n) for n in names if hasattr(nn, n))


LINEAR = (nn.Linear,)
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WEIGHTED = LINEAR + CONV
ACTIVATIONS = _nn("ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU", "Mish",
                  "Sigmoid", "Tanh", "Softplus", "Softsign", "Hardswish", "Hardsigmoid", "Hardtanh", "LogSigmoid",
                  "Tanhshrink", "Threshold", "Hardshrink", "Softshrink")
RELUS = _nn("ReLU", "ReLU6", "LeakyReLU")
BATCHNORMS = _nn("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm") + _torchvision("FrozenBatchNorm2d")
IDENTITIES = _nn("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout",
                 "Identity", "Flatten", "Unflatten") + _torchvision("StochasticDepth")
AVGPOOLS = _nn("AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d")
MAXPOOLS = _nn("MaxPool1d", "MaxPool2d", "MaxPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d")
UPSAMPLES = _nn("Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d")
PADDINGS = _nn("ZeroPad1d", "ZeroPad2d", "ZeroPad3d", "ConstantPad1d", "ConstantPad2d", "ConstantPad3d",
               "ReflectionPad1d", "ReflectionPad2d", "ReflectionPad3d", "ReplicationPad1d", "ReplicationPad2d",
               "ReplicationPad3d", "CircularPad1d", "CircularPad2d", "CircularPad3d", "PixelShuffle",
               "PixelUnshuffle", "ChannelShuffle")
SUMS = (Sum,)
GATES = (Gate,) + _functional("Scaled", "Normalize")
#: normalisation layers with a learned affine map (the LayerNorm rule: divisor held constant)
NORMS = _nn("LayerNorm", "GroupNorm", "RMSNorm") + _functional("LayerNormFn")
#: products of two activations, and the attention-weights-times-values product among them
PRODUCTS = _functional("Product", "MatMul")
ATTENTION_PRODUCTS = _functional("AttentionProduct")
SOFTMAXES = _nn("Softmax")
#: parameter-free linear reductions written functionally (Norm)
REDUCTIONS = _functional("Reduce")
