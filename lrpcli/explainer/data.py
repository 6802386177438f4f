"""Images from a DATA folder, preprocessed like torchvision's classification transforms.

DATA is an ImageFolder tree (one folder per class, labels = sorted folder index, empty class folders allowed)
or a flat folder of images (label -1); only regular files are images, and links to folders are not followed
(``_scan`` says why). Order is deterministic (class, then relative path), so row ``i`` of
an output file is always the same image and ``--resume`` can continue by index. An image that cannot be
decoded does not stop a 50,000-image run: it comes back as a marker that ``collate`` drops and reports.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lrpcli.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "Sample",
    "Skipped",
    "Batch",
    "Collated",
    "collate",
    "make_loader",
    "prefetch",
    "to_model_input",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Skipped(NamedTuple):
    """An image left out of a batch: its path relative to DATA and why."""

    filename: str
    reason: str


@dataclass
class Sample:
    """One item of ``ImageDataset``; ``error`` is set (and the tensors are None) when decoding failed."""

    input: torch.Tensor | None  # normalised float32 (C, H, W)
    image: torch.Tensor | None  # un-normalised uint8 (C, H, W), what the model saw before normalising
    label: int
    index: int
    filename: str
    error: str | None = None


@dataclass
class Batch:
    """Stacked samples in dataset order; ``len(batch)`` may be 0 when every image of a batch was skipped."""

    inputs: torch.Tensor  # float32 (N, C, H, W), normalised
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,), -1 without class folders
    indices: torch.Tensor  # int64 (N,), dataset indices
    filenames: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.filenames)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) on custom batch types."""
        return Batch(
            self.inputs.pin_memory(),
            self.images.pin_memory(),
            self.labels.pin_memory(),
            self.indices.pin_memory(),
            list(self.filenames),
        )

    def to(self, device: Any, non_blocking: bool = False) -> Batch:
        """The batch with its tensors on ``device``."""
        return Batch(
            *(
                t.to(device, non_blocking=non_blocking)
                for t in (self.inputs, self.images, self.labels, self.indices)
            ),
            list(self.filenames),
        )


class Collated(NamedTuple):
    """What the loader yields: the batch and the images skipped from it (as (filename, reason))."""

    batch: Batch
    skipped: list[Skipped]


class ImageDataset(Dataset):
    """The images under ``root``, preprocessed: resize (shorter side, bilinear, antialias), center crop,
    scale to [0, 1], normalise with ``mean``/``std``; gray, palette and RGBA images converted to ``mode``."""

    def __init__(
        self,
        root: str | Path,
        *,
        resize: int | None = 256,
        crop: int | None = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        mode: str = "RGB",
    ) -> None:
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode: expected RGB or L, got {mode!r}")
        n = 3 if mode == "RGB" else 1
        if len(mean) != n or len(std) != n:
            raise ValueError(
                f"mean and std need {n} values for mode {mode}, got {list(mean)} and {list(std)}"
            )
        self.root = Path(root)
        self.resize, self.crop, self.mode = resize, crop, mode
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor([float(s) for s in std], dtype=torch.float32).view(-1, 1, 1)
        self.classes, self.files, self.labels = _scan(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        filename, label = self.files[index], self.labels[index]
        try:
            image = self.load(self.root / filename)
        except Exception as err:  # noqa: BLE001 - any decoder failure is reported, never fatal
            reason = " ".join(str(err).split()) or type(err).__name__
            return Sample(None, None, label, index, filename, error=f"{type(err).__name__}: {reason}")
        return Sample(self.normalize(image), image, label, index, filename)

    def load(self, path: str | Path) -> torch.Tensor:
        """Decode, convert to ``mode``, resize and crop: a uint8 (C, H, W) tensor."""
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        with _open_regular(path) as file, Image.open(file) as img:
            img.load()
            img = _convert(img, self.mode)
        tensor = F.pil_to_tensor(img)
        if self.resize is not None:
            tensor = F.resize(tensor, [self.resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
        if self.crop is not None:
            tensor = F.center_crop(tensor, [self.crop, self.crop])
        return tensor.contiguous()

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (C, H, W) to the model's input: (image / 255 - mean) / std, float32."""
        return to_model_input(image, self.mean, self.std)

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.classes else "flat"
        return f"ImageDataset({str(self.root)!r}, {len(self)} images, {kind})"


def to_model_input(images: torch.Tensor | np.ndarray, mean: Sequence[float] | torch.Tensor | None = None,
                   std: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images (C, H, W) or (N, C, H, W), a tensor or a numpy array, as float32 in [0, 1], then
    ``(x - mean) / std`` where given.

    The one place the run's normalisation is written down: the data set uses it for every sample, and
    ``Results.inputs`` for the stored ``input`` rows, so both give the same tensors bit for bit.
    """
    x = torch.as_tensor(images).to(torch.float32) / 255.0
    if mean is None or std is None:
        return x
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return (x - m) / s


def _open_regular(path: str | Path) -> Any:
    """``path`` opened for reading, refused unless it is a regular file: the scan already left out FIFOs and
    devices, but one put in an image's place later would block the reader (O_NONBLOCK keeps the open itself
    from waiting)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _convert(img: Any, mode: str) -> Any:
    """To RGB or L; 16/32-bit gray scaled (not clipped) to 8 bits, transparency dropped like ImageFolder."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == mode else img.convert(mode)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _warn(message: str) -> None:
    warnings.warn(f"lrpcli: {message}", stacklevel=3)


class _Entry(NamedTuple):
    """One directory entry classified without opening it: ``kind`` is image, dir, link-dir or other."""

    name: str
    kind: str


def _classify(entry: os.DirEntry, where: str) -> _Entry:
    """What a listing entry is for the scan; warns (once, here) about entries named like images that are not
    regular files or are links to missing files, and about links to folders (never followed)."""
    name, path = entry.name, os.path.join(where, entry.name)
    if name.startswith("."):
        return _Entry(name, "other")
    if entry.is_symlink():
        try:
            mode = os.stat(entry.path).st_mode
        except OSError as err:
            if _is_image(name):
                _warn(f"{path}: link to {os.readlink(entry.path)!r} that cannot be read "
                      f"({err.strerror or err}), skipped")
            return _Entry(name, "other")
        if stat.S_ISDIR(mode):
            _warn(f"{path}: link to the folder {os.readlink(entry.path)!r}, not followed (links to folders "
                  "never are; mirror a folder from elsewhere with file links: cp -rs SRC DATA/)")
            return _Entry(name, "link-dir")
    elif entry.is_dir(follow_symlinks=False):
        return _Entry(name, "dir")
    elif not _is_image(name):
        return _Entry(name, "other")
    elif entry.is_file(follow_symlinks=False):  # known from the listing: no system call per image
        mode = stat.S_IFREG
    else:
        mode = entry.stat(follow_symlinks=False).st_mode
    if not _is_image(name):
        return _Entry(name, "other")
    if not stat.S_ISREG(mode):
        _warn(f"{path}: {_kind(mode)}, not a regular file, skipped")
        return _Entry(name, "other")
    return _Entry(name, "image")


def _list(path: str) -> list[_Entry] | None:
    """The classified entries of a folder in name order; None (with a warning) when it cannot be listed."""
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        return [_classify(e, path) for e in entries]
    except OSError as err:
        _warn(f"{path}: cannot read the folder ({err.strerror or err}), its images are left out")
        return None


def _walk(root: Path, top: str) -> list[str]:
    """The images under ``root/top`` (relative to ``root``, posix), without following links to folders."""
    found: list[str] = []
    pending = [top]
    while pending:
        rel = pending.pop()
        entries = _list(os.path.join(root, rel))
        for entry in entries or ():
            if entry.kind == "image":
                found.append(f"{rel}/{entry.name}")
            elif entry.kind == "dir":
                pending.append(f"{rel}/{entry.name}")
    return sorted(found)


def _scan(root: Path) -> tuple[list[str], list[str], list[int]]:
    """(classes, files relative to root in posix form, labels); DataError for a missing or image-less DATA.

    Only regular files are images (a FIFO named x.png would block the reader); links to files are followed,
    links to folders never are (they list images twice or leave DATA, and can loop). A class folder that cannot
    be read, or is a link, still counts as a class so that the other labels keep their indices.
    """
    if not root.exists():
        raise DataError(f"{root}: data folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder of images (or of class folders), got a file")
    try:
        with os.scandir(root) as it:
            entries = [_classify(e, str(root)) for e in sorted(it, key=lambda e: e.name)]
    except OSError as err:
        raise DataError(f"{root}: cannot list the data folder: {err.strerror or err}") from None
    class_dirs = [e.name for e in entries if e.kind in ("dir", "link-dir")]
    top_images = [e.name for e in entries if e.kind == "image"]
    if class_dirs and top_images:
        raise DataError(
            f"{root}: has both images ({top_images[0]!r}, ...) and class folders ({class_dirs[0]!r}, ...); "
            "use either one folder per class or a flat folder of images"
        )
    files: list[str] = []
    labels: list[int] = []
    if not class_dirs:
        files = top_images
        labels = [-1] * len(files)
    for label, entry in enumerate(e for e in entries if e.kind in ("dir", "link-dir")):
        found = _walk(root, entry.name) if entry.kind == "dir" else []
        files.extend(found)
        labels.extend([label] * len(found))
    if not files:
        where = f" or in its {len(class_dirs)} class folders" if class_dirs else ""
        raise DataError(
            f"{root}: no images found{where} (extensions: {', '.join(e[1:] for e in IMAGE_EXTENSIONS)})"
        )
    return class_dirs, files, labels


def collate(samples: Sequence[Sample]) -> Collated:
    """Stack the decodable samples into a Batch; the others become ``Skipped(filename, reason)`` entries."""
    good = [s for s in samples if s.error is None]
    skipped = [Skipped(s.filename, s.error or "") for s in samples if s.error is not None]
    if not good:
        empty = torch.empty(0)
        return Collated(
            Batch(empty, empty.to(torch.uint8), empty.to(torch.int64), empty.to(torch.int64), []), skipped
        )
    shapes = {tuple(s.input.shape) for s in good}
    if len(shapes) > 1:
        a, b = _two_shapes(good)
        raise DataError(
            f"{a.filename} is {tuple(a.input.shape)} but {b.filename} is {tuple(b.input.shape)} after "
            "preprocessing; set input.crop so every image has the same size"
        )
    return Collated(
        Batch(
            inputs=torch.stack([s.input for s in good]),
            images=torch.stack([s.image for s in good]),
            labels=torch.tensor([s.label for s in good], dtype=torch.int64),
            indices=torch.tensor([s.index for s in good], dtype=torch.int64),
            filenames=[s.filename for s in good],
        ),
        skipped,
    )


def _two_shapes(samples: Sequence[Sample]) -> tuple[Sample, Sample]:
    first = samples[0]
    other = next(s for s in samples if s.input.shape != first.input.shape)
    return first, other


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    start: int = 0,
    stop: int | None = None,
) -> DataLoader:
    """A DataLoader over dataset indices [start, stop) in order, yielding ``Collated(batch, skipped)``.

    ``start`` resumes a run, ``stop`` applies max_samples; memory is pinned for CUDA, workers are not kept
    between epochs (one pass only).
    """
    n = len(dataset)
    stop = n if stop is None else min(stop, n)
    start = max(0, min(start, stop))
    dev = (
        device
        if isinstance(device, torch.device)
        else torch.device(
            "cuda"
            if str(device) == "auto" and torch.cuda.is_available()
            else ("cpu" if str(device) == "auto" else device)
        )
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=range(start, stop),
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
        drop_last=False,
    )


def prefetch(items: Iterable, depth: int = 2) -> Prefetch:
    """The items of ``items`` in order, produced by a background thread up to ``depth`` items ahead.

    For a loader without worker processes: the next batch is decoded while the current one is attributed
    (PIL decoding and torch's preprocessing release the GIL). The thread starts now, not at the first ``next``,
    so the first batches decode while the caller sets up the rest (the composite, the writer). The runner
    creates it after loading the model, which must come first: a random init draws from torch's generator. An
    exception of the producer is raised here, at the item where it happened; ``close()`` (also before any item
    was taken) stops the thread after the item it is producing.
    """
    if depth < 1:
        raise ValueError(f"depth: expected an integer >= 1, got {depth!r}")
    return Prefetch(items, depth)


class Prefetch(Iterator):
    """The iterator ``prefetch`` returns: ``next`` takes the produced items in order, ``close`` ends the thread."""

    _END = object()

    def __init__(self, items: Iterable, depth: int) -> None:
        self._slots: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, args=(items,), name="lrpcli-reader", daemon=True)
        self._thread.start()

    def _offer(self, entry: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterable) -> None:
        try:
            for item in items:
                if not self._offer((item, None)):
                    return
            self._offer((self._END, None))
        except BaseException as err:  # noqa: BLE001 - re-raised in the consuming thread
            self._offer((self._END, err))

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item, err = self._slots.get()
        if item is self._END:
            self.close()
            if err is not None:
                raise err
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer (after the item it is producing) and wait for its thread."""
        self._done = True
        self._stop.set()
        self._thread.join()


def open_image_folder(data: str | Path, input_cfg: Any) -> ImageDataset:
    """DATA as an ImageDataset with the config's ``input`` section; a missing, non-folder or image-less DATA is
    a DataError naming it (explain and debug both start here)."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"DATA folder {data} does not exist")
    if not data.is_dir():
        raise DataError(f"DATA {data} is not a folder (expected class folders or images)")
    try:
        dataset = ImageDataset(data, resize=input_cfg.resize, crop=input_cfg.crop, mean=list(input_cfg.mean),
                               std=list(input_cfg.std), mode=input_cfg.mode)
    except ValueError as err:
        raise DataError(f"{data}: {err}") from None
    if len(dataset) == 0:
        raise DataError(f"DATA folder {data} holds no images (.jpg, .jpeg, .png, .bmp, .webp)")
    return dataset
