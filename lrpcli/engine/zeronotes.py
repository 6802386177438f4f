"""Which relevance tensors are known to be zero wherever a given tensor is (``ZeroNotes``), kept by the session
so that a layer below a ReLU is spared a pass over its output (``LayerCall.restore_output``)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch


class ZeroNotes:
    """Which relevance tensors are known to be zero wherever a given tensor is, kept by the session.

    A rule with ``proportional_to_inputs`` makes relevance that is zero wherever its input is; when that input is
    a ReLU's output, the layer below the ReLU (which keeps relu(z) as its output, ``LayerCall.rectify``) is then
    spared the pass over its output and relevance that ``restore_output`` would otherwise make. A note is keyed
    by the relevance tensor's id and holds it weakly (ids of dead tensors are reused), with the versions of both
    tensors: it holds only while neither changed. Notes are made and read within one backward; the session drops
    them at the start of each forward.
    """

    __slots__ = ("notes",)

    def __init__(self) -> None:
        #: id(relevance) -> (weak relevance, its version, weak input, the input's version, zero also where the
        #: input is < 0)
        self.notes: dict[int, tuple[weakref.ref, int, weakref.ref, int, bool]] = {}

    def mark(self, inputs: Sequence[torch.Tensor], result: Sequence[torch.Tensor | None]) -> None:
        """Each input's relevance in ``result`` is zero wherever that input is."""
        for x, r in zip(inputs, result):
            if r is not None and r.shape == x.shape and not x.is_meta:
                self.notes[id(r)] = (weakref.ref(r), r._version, weakref.ref(x), x._version, False)

    def mark_rectified(self, relevance: torch.Tensor, z: torch.Tensor) -> None:
        """``relevance`` is zero wherever relu(z) is, i.e. wherever z <= 0: the relevance of a recomputed ReLU
        output relu(z) (``relu_recompute``), noted against the z the layer below keeps whole."""
        if relevance.shape == z.shape and not z.is_meta:
            self.notes[id(relevance)] = (weakref.ref(relevance), relevance._version, weakref.ref(z), z._version, True)

    def _note(self, relevance: torch.Tensor) -> tuple[weakref.ref, int, weakref.ref, int, bool] | None:
        note = self.notes.get(id(relevance))
        return note if note is not None and note[0]() is relevance else None

    def hand_on(self, relevance: torch.Tensor, result: Sequence[torch.Tensor | None]) -> None:
        """A result holding the very elements of the relevance (a Pass that reshapes it: Flatten) keeps its
        note."""
        note = self._note(relevance)
        if note is not None:
            for r in result:
                if r is not None and r is not relevance and same_elements(r, relevance):
                    self.notes[id(r)] = (weakref.ref(r),) + note[1:]

    def known(self, relevance: torch.Tensor, output: torch.Tensor) -> bool:
        """True if ``relevance`` is known to be zero wherever ``output`` is: a note says so for a tensor holding
        the same elements as ``output``, and neither changed since."""
        return self._holds(self._note(relevance), relevance, output)

    def known_rectified(self, relevance: torch.Tensor, output: torch.Tensor) -> bool:
        """True if ``relevance`` is known to be zero wherever ``output`` is <= 0 (``mark_rectified``)."""
        note = self._note(relevance)
        return note is not None and note[4] and self._holds(note, relevance, output)

    @staticmethod
    def _holds(note: tuple | None, relevance: torch.Tensor, output: torch.Tensor) -> bool:
        """``note`` is about a tensor holding ``output``'s elements, and neither tensor changed since."""
        if note is None:
            return False
        _, version, ref, x_version, _ = note
        x = ref()
        return (x is not None and relevance._version == version and x._version == x_version
                and relevance.numel() == output.numel() and same_elements(x, output))

    def clear(self) -> None:
        self.notes.clear()


def same_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b hold the same elements in the same order (one is b itself, or both are the same memory with the
    same layout, or contiguous reshapes of one another)."""
    if a is b:
        return True
    if (a.dim() == 0 or b.dim() == 0 or a.data_ptr() != b.data_ptr() or a.dtype != b.dtype
            or a.device != b.device or a.numel() != b.numel() or a.shape[0] != b.shape[0]):
        return False
    return (a.shape == b.shape and a.stride() == b.stride()) or (a.is_contiguous() and b.is_contiguous())
