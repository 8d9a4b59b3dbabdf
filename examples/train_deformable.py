"""Train a small CNN with a tvm-dcn deformable layer on a toy task, next to plain-conv baselines.

The task: classify synthetic grey-scale shapes (circle, triangle, square, star, cross), each at a
random rotation, scale and position, with noise. The networks differ in one layer only:

* a ``tvm_dcn.DeformConv2dPack`` (3x3; its offsets predicted from the input by ``conv_offset``);
* an ``nn.Conv2d`` of the same size, starting from the same weights: the deformable layer starts
  with zero offsets, so at step 0 the two networks compute the same function and any difference
  comes from the learned offsets;
* an ``nn.Conv2d`` with more output channels, so that its network has as many parameters as the
  deformable one (``conv_offset`` adds 18 * 9 weights per input channel).

The network is deliberately shallow (its plain version sees 7x7 pixels; ``--head`` adds a conv
layer and widens the view). Data are generated in the script with fixed seeds; CPU only.

    python examples/train_deformable.py             # full run (about a minute on 2 cores)
    python examples/train_deformable.py --quick     # about 10 s, for the test suite
    python examples/train_deformable.py --autocast bf16   # forward passes under bfloat16 autocast

``--autocast bf16`` runs the forward passes (training and evaluation) under
``torch.autocast("cpu", dtype=torch.bfloat16)``: the convolutions, the deformable one included,
compute in bfloat16 and the parameters stay float32 (no loss scaling: bfloat16 has float32's range).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time

import tvm_dcn  # before torch: sets the thread-pool policies (README, "Threads")
import torch
from torch import nn
import torch.nn.functional as F

CLASSES = ("circle", "triangle", "square", "star", "cross")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16}


def _polygon_radius(angle: torch.Tensor, sides: int) -> torch.Tensor:
    """Distance from the centre to the edge of a regular polygon of circumradius 1."""
    sector = 2 * math.pi / sides
    return math.cos(math.pi / sides) / torch.cos(torch.remainder(angle, sector) - sector / 2)


def _star_radius(angle: torch.Tensor, points: int = 5, inner: float = 0.45) -> torch.Tensor:
    sector = 2 * math.pi / points
    t = (torch.remainder(angle, sector) / sector - 0.5).abs() * 2  # 1 at the tips, 0 between
    return inner + (1 - inner) * t


def make_shapes(count: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (count, 1, size, size) of random shapes and their labels (count,)."""
    labels = torch.randint(len(CLASSES), (count,), generator=generator)
    scale = (0.35 + 0.6 * torch.rand(count, generator=generator)) * size / 2  # circumradius in pixels
    rotation = torch.rand(count, generator=generator) * 2 * math.pi
    centre = size / 2 - 0.5 + (torch.rand(count, 2, generator=generator) - 0.5) * 4
    coords = torch.arange(size, dtype=torch.float32)
    dy = (coords.view(1, size, 1) - centre[:, 0].view(-1, 1, 1)) / scale.view(-1, 1, 1)
    dx = (coords.view(1, 1, size) - centre[:, 1].view(-1, 1, 1)) / scale.view(-1, 1, 1)
    rho = torch.sqrt(dy * dy + dx * dx)
    angle = torch.atan2(dy, dx) - rotation.view(-1, 1, 1)
    u = rho * torch.cos(angle)  # coordinates in the shape's own (rotated) frame
    v = rho * torch.sin(angle)
    inside = torch.stack([
        rho < 0.8,                                                      # circle
        rho < _polygon_radius(angle, 3),                                # triangle
        rho < 0.85 * _polygon_radius(angle, 4),                         # square
        rho < _star_radius(angle),                                      # star
        ((u.abs() < 0.28) & (v.abs() < 0.95)) | ((v.abs() < 0.28) & (u.abs() < 0.95)),  # cross
    ], dim=1)
    image = inside[torch.arange(count), labels].float()
    brightness = 0.5 + 0.5 * torch.rand(count, 1, 1, generator=generator)
    noise = 0.25 * torch.randn(count, size, size, generator=generator)
    return (image * brightness + noise).unsqueeze(1), labels


class Net(nn.Module):
    """stem (plain 3x3, stride 2) -> the layer under test (3x3) -> [3x3 conv] -> global max pool
    -> linear. Without the optional head conv, a plain layer sees 7x7 input pixels: shapes of up
    to about 23 pixels across must be told apart from local evidence, unless the layer learns to
    look further."""

    def __init__(self, layer: nn.Module, width: int, head: bool):
        super().__init__()
        channels = layer.out_channels
        self.stem = nn.Conv2d(1, width, 3, stride=2, padding=1)
        self.layer = layer
        self.head = nn.Conv2d(channels, channels, 3, padding=1) if head else None
        self.classify = nn.Linear(channels, len(CLASSES))

    def forward(self, x):
        x = F.relu(self.layer(F.relu(self.stem(x))))
        if self.head is not None:
            x = F.relu(self.head(F.max_pool2d(x, 2)))
        return self.classify(x.amax(dim=(2, 3)))


def _parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def make_nets(args) -> dict[str, Net]:
    """The deformable net; its plain twin (same size of layer, identical initial weights); and a
    plain net whose layer has more output channels, for as many parameters as the deformable
    net has with its offset predictor."""
    torch.manual_seed(args.seed)
    cls = tvm_dcn.ModulatedDeformConv2dPack if args.modulated else tvm_dcn.DeformConv2dPack
    width = args.width
    deform = Net(cls(width, 2 * width, 3, padding=1, bias=True), width, args.head)
    plain = Net(nn.Conv2d(width, 2 * width, 3, padding=1), width, args.head)
    plain.load_state_dict({k: v for k, v in deform.state_dict().items() if "conv_offset" not in k})
    channels = 2 * width
    while _parameters(Net(nn.Conv2d(width, channels, 3, padding=1), width, args.head)) < _parameters(deform):
        channels += 1
    wide = Net(nn.Conv2d(width, channels, 3, padding=1), width, args.head)
    name = "modulated deformable (DCNv2)" if args.modulated else "deformable (DCNv1)"
    return {name: deform, "plain conv": plain, f"plain conv, {channels} channels": wide}


def forward_context(args):
    """The context of the forward passes: autocast if asked for (``--autocast``)."""
    if args.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=AUTOCAST_DTYPES[args.autocast])


def evaluate(net: Net, images: torch.Tensor, labels: torch.Tensor, args) -> tuple[float, float]:
    net.eval()
    loss, correct = 0.0, 0
    batch = args.batch
    with torch.no_grad():
        for i in range(0, len(images), batch):
            with forward_context(args):
                logits = net(images[i:i + batch])
            loss += F.cross_entropy(logits, labels[i:i + batch], reduction="sum").item()
            correct += (logits.argmax(1) == labels[i:i + batch]).sum().item()
    return loss / len(images), correct / len(images)


def train(name: str, net: Net, data: dict, args) -> dict:
    """Adam with a cosine learning-rate decay; returns the per-epoch history and per-step losses."""
    torch.manual_seed(args.seed + 1)  # same batch order for every net
    offset_params = [p for n, p in net.named_parameters() if "conv_offset" in n]
    other_params = [p for n, p in net.named_parameters() if "conv_offset" not in n]
    groups = [{"params": other_params}]
    if offset_params:  # the usual practice for DCN: a smaller learning rate for the offsets
        groups.append({"params": offset_params, "lr": args.lr * args.offset_lr_mult})
    opt = torch.optim.Adam(groups, lr=args.lr)
    images, labels = data["train"]
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * (len(images) // args.batch))
    steps, history = [], []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        net.train()
        order = torch.randperm(len(images))
        for i in range(0, len(images), args.batch):
            idx = order[i:i + args.batch]
            with forward_context(args):  # the backward outside it, as torch.autocast recommends
                loss = F.cross_entropy(net(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            steps.append(loss.item())
        per_epoch = len(images) // args.batch
        train_loss = sum(steps[-per_epoch:]) / per_epoch
        test_loss, test_acc = evaluate(net, *data["test"], args)
        history.append(dict(epoch=epoch, train_loss=train_loss, test_loss=test_loss, test_acc=test_acc))
        print(f"  {name:30s} epoch {epoch:2d}  train loss {train_loss:.3f}  test loss {test_loss:.3f}  "
            f"test acc {100 * test_acc:5.1f}%  ({time.perf_counter() - start:.1f} s)")
    return dict(history=history, steps=steps, seconds=time.perf_counter() - start,
                parameters=_parameters(net))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (--quick: 6)")
    parser.add_argument("--train", type=int, default=None, help="training images (default 4096; --quick: 1024)")
    parser.add_argument("--test", type=int, default=1024, help="test images")
    parser.add_argument("--size", type=int, default=24, help="image side in pixels")
    parser.add_argument("--width", type=int, default=16, help="channels of the stem")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--offset-lr-mult", type=float, default=0.1)
    parser.add_argument("--modulated", action="store_true", help="ModulatedDeformConv2dPack (DCNv2)")
    parser.add_argument("--head", action="store_true", help="add a 3x3 conv after the layer (wider view)")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), default=None,
                        help="run the forward passes under torch.autocast('cpu') in this dtype")
    parser.add_argument("--quick", action="store_true", help="a reduced run for tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 6 if args.quick else 10
    if args.train is None:
        args.train = 1024 if args.quick else 4096
    if args.quick:
        args.test = min(args.test, 256)
    # Whole batches only: every batch then has the same shape, and tvm-dcn builds its kernels once.
    args.train -= args.train % args.batch
    args.test -= args.test % args.batch
    if args.train == 0 or args.test == 0:
        parser.error("--train and --test need at least one batch")

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    data = {"train": make_shapes(args.train, args.size, generator),
            "test": make_shapes(args.test, args.size, generator)}
    print(f"{len(CLASSES)} classes ({', '.join(CLASSES)}), {args.train} training / {args.test} test images "
        f"of {args.size}x{args.size}, {args.epochs} epochs, batch {args.batch}, {torch.get_num_threads()} threads"
        + (f", autocast {args.autocast}" if args.autocast else ""))
    results = {}
    for name, net in make_nets(args).items():
        results[name] = train(name, net, data, args)
    print("final:")
    for name, r in results.items():
        last = r["history"][-1]
        print(f"  {name:30s} test acc {100 * last['test_acc']:5.1f}%  test loss {last['test_loss']:.3f}  "
            f"{r['parameters']} parameters  {r['seconds']:.1f} s")
    print(f"total {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
