"""Train the demo CNN on the generated shapes data set and ship its weights as ``share/demo/model.pt``.

The training set (seed 0) and the held-out set (seed 999) are generated in memory by ``make_data.generate``;
nothing but the weights is written. Both carry the demo's planted shortcut (a tag on 3/8 of the triangles, see
``make_data``). The script prints the held-out accuracy, the accuracy on the shipped 96-image demo set
(``share/demo/images``, seed 1234), and whether the model uses the tag: how often held-out images of the other
classes are called "triangle" with the tag pasted on, against without. CPU only, one thread, seeded::

    python share/demo/train.py            # default: 600 images per class, 10 epochs, Adam, one-cycle lr 1e-2
    python share/demo/train.py --epochs 20 --out /tmp/model.pt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_data  # noqa: E402
import model as demo_model  # noqa: E402

TRAIN_SEED = 0
HELDOUT_SEED = 999
DEMO_SEED = 1234


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """uint8 PIL images -> normalised float32 N x 3 x 64 x 64 (mean 0.5, std 0.25, as in the demo config)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    mean = torch.tensor(demo_model.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(demo_model.STD).view(1, 3, 1, 1)
    return (x - mean) / std


def generated(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for c, _, img, _ in make_data.generate(n_per_class, seed):
        images.append(img)
        labels.append(c)
    return to_tensor(images), torch.tensor(labels, dtype=torch.int64)


def shipped_demo_set(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped ImageFolder tree (labels = sorted class folder index, as lrpcli reads it)."""
    classes = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    assert tuple(classes) == make_data.CLASSES, classes
    images, labels = [], []
    for cname in classes:
        for f in sorted((root / "images" / cname).glob("*.png")):
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
            labels.append(make_data.CLASSES.index(cname))
    return to_tensor(images), torch.tensor(labels, dtype=torch.int64)


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((net(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


@torch.no_grad()
def shortcut_check(net: nn.Module, n_per_class: int, seed: int = HELDOUT_SEED) -> dict[str, float]:
    """How much the model relies on the tag, on untagged held-out images of the classes that never carry it:
    the share called the tagged class and its mean softmax probability, without and with the tag pasted on."""
    target = make_data.CLASSES.index(make_data.WATERMARK_CLASS)
    plain, tagged = [], []
    for c, _, img, _ in make_data.generate(n_per_class, seed, watermark_fraction=0.0):
        if c != target:
            plain.append(img)
            tagged.append(make_data.paste_watermark(img)[0])
    net.eval()
    out = {}
    for key, images in (("plain", plain), ("tagged", tagged)):
        prob = torch.softmax(net(to_tensor(images)), dim=1)
        out[f"{key}_called"] = float((prob.argmax(1) == target).float().mean())
        out[f"{key}_prob"] = float(prob[:, target].mean())
    return out


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal / vertical flips and 90-degree turns (every class is invariant under them)."""
    n = len(x)
    hflip = torch.rand(n, generator=gen) < 0.5
    vflip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(hflip.view(n, 1, 1, 1), x.flip(3), x)
    x = torch.where(vflip.view(n, 1, 1, 1), x.flip(2), x)
    turn = torch.rand(n, generator=gen) < 0.5
    return torch.where(turn.view(n, 1, 1, 1), x.transpose(2, 3), x)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the lrpcli demo CNN on generated shapes.")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--per-class", type=int, default=600, help="training images per class (default 600)")
    p.add_argument("--heldout-per-class", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0, help="torch seed for init, shuffling and augmentation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "model.pt")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()

    x_train, y_train = generated(args.per_class, TRAIN_SEED)
    x_held, y_held = generated(args.heldout_per_class, HELDOUT_SEED)
    print(f"generated {len(x_train)} training and {len(x_held)} held-out images "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)

    net = demo_model.build(len(make_data.CLASSES))
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)

    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(x_train), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb, yb = augment(x_train[idx], gen), y_train[idx]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        print(f"epoch {epoch + 1:2d}/{args.epochs}  loss {total / n:.4f}  "
              f"held-out acc {accuracy(net, x_held, y_held):.4f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    net.eval()
    held = accuracy(net, x_held, y_held)
    print(f"held-out accuracy (seed {HELDOUT_SEED}, {len(x_held)} images): {held:.4f}")
    check = shortcut_check(net, args.heldout_per_class)
    print(f"tag pasted on held-out {', '.join(c for c in make_data.CLASSES if c != make_data.WATERMARK_CLASS)} "
          f"images: called {make_data.WATERMARK_CLASS} {check['tagged_called']:.4f} "
          f"(mean p {check['tagged_prob']:.4f}); without the tag {check['plain_called']:.4f} "
          f"(mean p {check['plain_prob']:.4f})")
    if (HERE / "images").is_dir():
        x_demo, y_demo = shipped_demo_set(HERE)
        print(f"shipped demo set accuracy (share/demo/images, {len(x_demo)} images): "
              f"{accuracy(net, x_demo, y_demo):.4f}")
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB); "
          f"total time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
