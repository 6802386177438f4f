"""Train the demo ViT (``vit.py``) on the generated shapes data set and ship its weights as ``share/demo/vit.pt``.

The data come from the CNN's training script (``train.py``): the same generator, training set (seed 0),
held-out set (seed 999) and flips and turns, plus small random shifts. The convolutional stem starts from the
trained demo CNN's feature layers (``model.pt``); everything is then trained together. The weights are stored
in float16 (half the size; ``load_state_dict`` casts them back to float32) and the accuracy is measured with
the stored, rounded weights. CPU only, one thread, seeded and deterministic::

    python share/demo/train_vit.py                # default: 600 images per class, 6 epochs, AdamW, one-cycle
    python share/demo/train_vit.py --epochs 3 --out /tmp/vit.pt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train  # noqa: E402
import vit  # noqa: E402
from make_data import CLASSES  # noqa: E402


def shift(x: torch.Tensor, gen: torch.Generator, most: int) -> torch.Tensor:
    """Translate each image by up to ``most`` pixels in x and y (reflect-padded), so that the position
    embedding cannot tie a class to where its shapes tend to sit."""
    if most <= 0:
        return x
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (most, most, most, most), mode="reflect")
    dy = torch.randint(0, 2 * most + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * most + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def half_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict in float16, as shipped."""
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).clone().contiguous()
            for k, v in net.state_dict().items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the lrpcli demo ViT on generated shapes.")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--per-class", type=int, default=600, help="training images per class (default 600)")
    p.add_argument("--heldout-per-class", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--shift", type=int, default=4, help="largest random translation in pixels (default 4)")
    p.add_argument("--seed", type=int, default=0, help="torch seed for init, shuffling and augmentation")
    p.add_argument("--stem-from", type=Path, default=HERE / "model.pt",
                   help="initialise the convolutional stem from this demo CNN state_dict (default model.pt)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "vit.pt")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()

    x_train, y_train = train.generated(args.per_class, train.TRAIN_SEED)
    x_held, y_held = train.generated(args.heldout_per_class, train.HELDOUT_SEED)
    print(f"generated {len(x_train)} training and {len(x_held)} held-out images "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)

    net = vit.build(len(CLASSES))
    if args.stem_from is not None:
        cnn = torch.load(args.stem_from, map_location="cpu", weights_only=True)
        features = {k[len("features."):]: v for k, v in cnn.items() if k.startswith("features.")}
        net.conv_proj.features.load_state_dict(features)
        print(f"stem initialised from {args.stem_from}", flush=True)
    decay = [q for n, q in net.named_parameters() if q.dim() >= 2 and "embedding" not in n]
    rest = [q for n, q in net.named_parameters() if not (q.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    gen = torch.Generator().manual_seed(args.seed)

    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(x_train), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb, yb = shift(train.augment(x_train[idx], gen), gen, args.shift), y_train[idx]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        print(f"epoch {epoch + 1:2d}/{args.epochs}  loss {total / n:.4f}  "
              f"held-out acc {train.accuracy(net, x_held, y_held):.4f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    state = half_state(net)
    net.load_state_dict(state)  # measure what is shipped: the float16-rounded weights
    net.eval()
    print(f"held-out accuracy (seed {train.HELDOUT_SEED}, {len(x_held)} images, float16 weights): "
          f"{train.accuracy(net, x_held, y_held):.4f}")
    if (HERE / "images").is_dir():
        x_demo, y_demo = train.shipped_demo_set(HERE)
        print(f"shipped demo set accuracy (share/demo/images, {len(x_demo)} images): "
              f"{train.accuracy(net, x_demo, y_demo):.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB); "
          f"total time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
