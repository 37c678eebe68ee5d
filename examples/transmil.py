#!/usr/bin/env python
"""A TransMIL-style bag classifier built on ``nystromer.compat``, with a class-token heatmap.

    python examples/transmil.py                     # 300 steps, two minutes on 2 CPU cores
    python examples/transmil.py --bag-size 5000 --out slide.png
    python examples/transmil.py --attention nystrom-attention --save model.pt

Multiple-instance learning as in whole-slide pathology: a bag (a slide) is n instance feature
vectors (its patches); it is positive when a few of them are "key" instances (a small lesion).
Here the bags are synthetic: instances are Gaussian noise, a positive bag's 2 to 6 key
instances are shifted along one fixed direction. The model is TransMIL's core: a linear
embedding, a class token in front, two pre-norm layers ``x + attn(LayerNorm(x))`` with
``NystromAttention(dim, dim_head=dim // 8, heads=8, num_landmarks=m, residual=True,
dropout=0.1)``, a LayerNorm and a linear head on the class token (TransMIL's convolutional
position encoding is left out). TransMIL has dim = 512 and m = 256; the defaults here are
smaller, so that it trains in minutes on a CPU. The import is the one line a TransMIL code
base changes: ``from nystromer.compat import NystromAttention``.

After training, the class token's row of the first layer's attention over the instances
(``attn[:, :, 0, 1:]``, the class token's own column left out; mean over the heads) is drawn for
one positive bag, its instances laid out on a square grid as patches on a slide, with the key
instances circled. (In this model the class token gathers the key
instances in the first layer; the second layer's row, ``--layer 1``, is nearly uniform.)
``--attention nystrom-attention`` trains the model on the ``nystrom-attention`` package
instead, and ``--save model.pt`` writes the trained model (weights, the settings that rebuild
it, the training losses; :func:`load` reads it back): ``benchmarks/mil_switch.py --model
model.pt`` measures what switching such a model to nystromer changes (docs/mil.md).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nystromer.compat import NystromAttention

#: Which instances of a positive bag are keys: between these many, inclusive.
KEYS = (2, 6)
#: What ``--save`` writes in its file's ``format`` field, for :func:`load` to recognise it.
SAVED_FORMAT = "examples/transmil.py model"


def make_bags(
    batch: int, n: int, features: int, generator: torch.Generator, signal: float = 6.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``batch`` synthetic bags of ``n`` instances, about half of them positive.

    Instances are N(0, I) in ``features`` dimensions; a positive bag has ``KEYS`` (2 to 6) key
    instances at random positions, shifted by a fixed vector of length ``signal``.

    Returns:
        bags (B, n, features), labels (B,) int64 in {0, 1}, keys (B, n) bool.
    """
    pattern = torch.randn(features, generator=torch.Generator().manual_seed(0))
    pattern *= signal / pattern.norm()
    bags = torch.randn(batch, n, features, generator=generator)
    labels = torch.randint(0, 2, (batch,), generator=generator)
    keys = torch.zeros(batch, n, dtype=torch.bool)
    for i in range(batch):
        if labels[i]:
            count = int(torch.randint(KEYS[0], KEYS[1] + 1, (), generator=generator))
            keys[i, torch.randperm(n, generator=generator)[: min(count, n)]] = True
    bags += keys[..., None] * pattern
    return bags, labels, keys


class TransLayer(nn.Module):
    """TransMIL's layer: ``x + attn(LayerNorm(x))`` (B, n, dim) → (B, n, dim)."""

    def __init__(self, dim: int, landmarks: int, attention: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = attention(
            dim=dim,
            dim_head=dim // 8,
            heads=8,
            num_landmarks=landmarks,
            pinv_iterations=6,
            residual=True,
            dropout=0.1,
        )

    def forward(self, x: Tensor, return_attn: bool = False):
        if return_attn:
            out, attn = self.attn(self.norm(x), return_attn=True)
            return x + out, attn
        return x + self.attn(self.norm(x))


class TransMIL(nn.Module):
    """Bags (B, n, features) → class logits (B, classes).

    Args:
        features: width of the instance features.
        dim: model width (TransMIL: 512); 8 heads of dim / 8.
        classes: number of classes.
        landmarks: m (TransMIL: dim / 2 = 256).
        attention: the attention class, called with the ``nystrom-attention`` package's
            arguments (``nystromer.compat.NystromAttention`` or the package's own).
    """

    def __init__(
        self,
        features: int,
        dim: int = 512,
        classes: int = 2,
        landmarks: int = 256,
        attention: Callable[..., nn.Module] = NystromAttention,
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(features, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.layers = nn.ModuleList([TransLayer(dim, landmarks, attention) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def _tokens(self, bags: Tensor) -> Tensor:
        x = self.embed(bags)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)

    def forward(self, bags: Tensor) -> Tensor:
        x = self._tokens(bags)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x[:, 0]))

    def heatmap(self, bags: Tensor, layer: int = 0) -> Tensor:
        """The class token's attention over the instances in one layer: (B, heads, n)."""
        x = self._tokens(bags)
        for earlier in self.layers[:layer]:
            x = earlier(x)
        _, attn = self.layers[layer](x, return_attn=True)
        # numerics="lucidrains" keeps the package's front padding: token i is row pad + i.
        pad = attn.shape[-1] - x.shape[1]
        return attn[:, :, pad, pad + 1 :]


def train(
    model: nn.Module,
    steps: int,
    sizes: Sequence[int],
    features: int,
    generator: torch.Generator,
    batch: int = 4,
    lr: float = 1e-3,
) -> list[float]:
    """``steps`` AdamW steps on fresh synthetic batches; each batch's bag size is drawn
    uniformly from ``sizes`` (min, max). Returns the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    model.train()
    losses = []
    for _ in range(steps):
        n = int(torch.randint(sizes[0], sizes[1] + 1, (), generator=generator))
        bags, labels, _ = make_bags(batch, n, features, generator)
        loss = F.cross_entropy(model(bags), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def load(
    path: str, attention: Callable[..., nn.Module] = NystromAttention
) -> tuple[TransMIL, dict]:
    """The model ``--save`` wrote to ``path``, built on ``attention`` (in eval mode), and the
    saved dict: ``settings`` (features, dim, landmarks, attention trained with) and
    ``training`` (command, steps, batch, seed, losses, seconds).

    Raises:
        ValueError: ``path`` is not a file written by ``--save``.
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # on a foreign file torch.load raises whatever its parse hits
        reason = f"torch.load with weights_only=True: {type(error).__name__}"
        raise ValueError(
            f"{path} was not written by examples/transmil.py --save ({reason})"
        ) from error
    if not isinstance(saved, dict) or saved.get("format") != SAVED_FORMAT:
        raise ValueError(f"{path} was not written by examples/transmil.py --save")
    s = saved["settings"]
    model = TransMIL(s["features"], s["dim"], landmarks=s["landmarks"], attention=attention)
    model.load_state_dict(saved["state_dict"], strict=True)
    return model.eval(), saved


def save_heatmap(weights: Tensor, keys: Tensor, path: str) -> None:
    """Draw one bag's (n,) attention weights on a square grid, key instances circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(weights)
    side = math.ceil(math.sqrt(n))
    grid = torch.full((side * side,), float("nan"))
    grid[:n] = weights
    fig, ax = plt.subplots(figsize=(5, 4.4))
    image = ax.imshow(grid.view(side, side).numpy(), cmap="magma")
    where = keys.nonzero().squeeze(1)
    ax.scatter(
        (where % side).numpy(),
        (where // side).numpy(),
        s=120,
        facecolors="none",
        edgecolors="cyan",
        label="keys",
    )
    ax.set_title(f"class-token attention, mean of heads (n = {n})", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--dim", type=int, default=128, help="model width, a multiple of 8")
    parser.add_argument("--landmarks", type=int, default=64, help="m, landmarks per head")
    parser.add_argument("--features", type=int, default=64, help="instance feature width")
    parser.add_argument(
        "--train-sizes", type=int, nargs=2, default=(32, 1024), metavar=("MIN", "MAX")
    )
    parser.add_argument("--batch", type=int, default=4, help="bags per training step")
    parser.add_argument(
        "--attention",
        choices=("nystromer", "nystrom-attention"),
        default="nystromer",
        help="train on nystromer.compat or on the nystrom-attention package",
    )
    parser.add_argument("--save", metavar="PATH", help="write the trained model here")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--bag-size", type=int, default=1000, help="n of the bag drawn")
    parser.add_argument("--eval-bags", type=int, default=32, help="bags the accuracy is taken on")
    parser.add_argument("--layer", type=int, default=0, choices=(0, 1), help="whose heatmap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="heatmap.png", help="where the PNG goes")
    args = parser.parse_args(argv)
    if args.dim < 8 or args.dim % 8:
        parser.error(f"--dim must be a positive multiple of 8, got {args.dim}")

    attention = NystromAttention
    if args.attention == "nystrom-attention":
        from nystrom_attention import NystromAttention as attention
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = TransMIL(args.features, args.dim, landmarks=args.landmarks, attention=attention)
    start = time.perf_counter()
    losses = train(model, args.steps, args.train_sizes, args.features, generator, batch=args.batch)
    seconds = time.perf_counter() - start
    if args.save:
        argv = sys.argv[1:] if argv is None else argv
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(args, k) for k in ("features", "dim", "landmarks", "attention")}
        training = {"steps": args.steps, "batch": args.batch, "seed": args.seed}
        training |= {"train_sizes": list(args.train_sizes), "losses": losses, "seconds": seconds}
        training["command"] = shlex.join(["python", "examples/transmil.py", *argv])
        torch.save(
            {
                "format": SAVED_FORMAT,
                "settings": settings,
                "training": training,
                "state_dict": model.state_dict(),
            },
            args.save,
        )

    model.eval()
    with torch.no_grad():
        bags, labels, _ = make_bags(args.eval_bags, args.bag_size, args.features, generator)
        accuracy = (model(bags).argmax(-1) == labels).float().mean().item()
        bag, _, keys = make_bags(1, args.bag_size, args.features, generator)
        while not keys.any():  # a positive bag
            bag, _, keys = make_bags(1, args.bag_size, args.features, generator)
        weights = model.heatmap(bag, args.layer)[0].mean(0)  # (n,): mean over the heads
    save_heatmap(weights, keys[0], args.out)
    key_share = weights[keys[0]].sum().item()
    print(
        f"loss {losses[0]:.3f} → {losses[-1]:.3f} in {args.steps} steps; accuracy at "
        f"n = {args.bag_size}: {accuracy:.2f}; the {int(keys.sum())} key instances hold "
        f"{key_share:.0%} of the class token's attention in layer {args.layer}; heatmap: {args.out}"
        + (f"; model: {args.save}" if args.save else "")
    )
    return {
        "model": model,
        "losses": losses,
        "accuracy": accuracy,
        "key_share": key_share,
        "out": args.out,
    }


if __name__ == "__main__":
    main()
