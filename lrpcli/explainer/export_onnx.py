"""The exported attribution as ONNX (``lrpcli export --onnx``), through torch's dynamo ONNX exporter.

The captured program holds only aten operations; the exporter converts all of them but ``prims.signbit``
(from ``torch.copysign`` in the stabilizers), which gets its own translation here. An operation the exporter
cannot convert is one line naming it and where in the program it is used.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lrpcli.explainer.export_program import ExportError, all_nodes, chain

#: operations the decompositions make, and the operation of the captured program they come from
ORIGINS = {"prims.signbit.default": "aten.copysign.Tensor"}

EXTRA = "pip install 'lrpcli[export]' (onnx, onnxscript; onnxruntime to run it)"


def _translations() -> dict[Any, Any]:
    """aten/prims operations the exporter has no conversion for, written in onnxscript."""
    from onnxscript import opset18 as op

    def signbit(x):
        # 1/x keeps the sign of zeros (1/-0 = -inf), so negative numbers and -0.0 give True, as signbit does
        return op.Less(op.Reciprocal(x), op.CastLike(0.0, x))

    return {torch.ops.prims.signbit.default: signbit}


def _conv_input_grad(grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias_sizes: Any,
                     stride: list[int], padding: list[int], dilation: list[int], transposed: bool,
                     output_padding: list[int], groups: int, output_mask: list[bool]) -> tuple:
    """convolution_backward for the input only (what the rules take: W^T v) as the transposed convolution,
    which ONNX has; the output padding restores the input's size where the stride dropped rows."""
    if output_mask[1] or output_mask[2]:
        raise NotImplementedError("convolution_backward for weight or bias")
    if transposed:
        grad = torch.ops.aten.convolution(grad_output, weight, None, stride, padding, dilation, False,
                                          [0] * len(stride), groups)
        return grad, None, None
    extra = []
    for i, (s, p, d) in enumerate(zip(stride, padding, dilation)):
        k, out, size = weight.shape[2 + i], grad_output.shape[2 + i], x.shape[2 + i]
        extra.append(size - ((out - 1) * s - 2 * p + d * (k - 1) + 1))
    grad = torch.ops.aten.convolution(grad_output, weight, None, stride, padding, dilation, True, extra, groups)
    return grad, None, None


def to_onnx(program: torch.export.ExportedProgram) -> Any:
    """The ONNX program of an exported attribution (batch dimension dynamic where the program's is)."""
    try:
        import onnxscript  # noqa: F401
    except ModuleNotFoundError:
        raise ExportError(f"--onnx needs the onnx and onnxscript packages: {EXTRA}") from None
    try:
        # the exporter's own decompositions first, so that the nodes it names are nodes of this program
        table = torch.export.default_decompositions()
        table[torch.ops.aten.convolution_backward.default] = _conv_input_grad
        table[torch.ops.aten.copysign.Tensor] = torch._refs.copysign  # as the exporter would, to prims.signbit
        decomposed = program.run_decompositions(table)
        return torch.onnx.export(decomposed, dynamo=True, custom_translation_table=_translations(), verbose=False)
    except Exception as err:
        raise ExportError(unconvertible(program, err)) from err


def save_onnx(program: torch.export.ExportedProgram, path: Path) -> None:
    """Convert and write ``path``; an unconvertible operation or an unwritable file is an ExportError."""
    onnx_program = to_onnx(program)
    try:
        onnx_program.save(str(path))
    except OSError as err:
        raise ExportError(f"--onnx: cannot write {path}: {err.strerror or err}") from None


def unconvertible(program: torch.export.ExportedProgram, err: BaseException) -> str:
    """One line: the operation the exporter could not convert and the layer whose rule or forward used it."""
    text = "\n".join(str(e) for e in chain(err))
    found = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", text)
    node = re.search(r"Error when translating node %(\w+)", text)
    operation = f"{found[1]}.{found[2]}" if found else (node[1] if node else None)
    if operation is None:
        first = str(err).strip().split("\n")[0]
        return f"--onnx: the ONNX exporter failed: {first[:300]}"
    layer = layer_of(program, node[1] if node else None, ORIGINS.get(operation, operation))
    where = f" (used by layer {layer!r})" if layer else ""
    return (f"--onnx: the ONNX exporter cannot convert operation {operation}{where}; the .pt2 program does not "
            "need ONNX and runs as is")


def layer_of(program: torch.export.ExportedProgram, node_name: str | None, operation: str) -> str | None:
    """The layer the named node (else the first node of ``operation``) was captured for, where
    ``export_program`` could tell (its ``lrpcli_layer`` metadata)."""
    nodes = [n for n in all_nodes(program) if n.name == node_name] or [
        n for n in all_nodes(program) if n.op == "call_function" and str(n.target) == operation]
    for node in nodes:
        layer = node.meta.get("custom", {}).get("lrpcli_layer")
        if layer is not None:
            return layer
    return None
