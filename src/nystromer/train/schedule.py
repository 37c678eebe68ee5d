"""The one-cycle schedule of the Nyströmformer LRA runs, defined for every warm-up length."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["OneCycle"]


class OneCycle(LRScheduler):
    """Linear warm-up then linear decay of the learning rate, with Adam's β₁ cycled opposite.

    The authors trained LRA with ``torch.optim.lr_scheduler.OneCycleLR(max_lr=lr,
    pct_start=warmup/steps, anneal_strategy="linear")`` and its defaults; this is the same
    curve, written out so that it is also defined for a warm-up of one step (where
    ``OneCycleLR`` divides by zero) and reaches the peak after exactly ``warmup_steps``:

    - step t < W: lr = lr₀ + (peak − lr₀)·t/W, with lr₀ = peak/25, and β₁ from 0.95 to 0.85;
    - step t ≥ W: lr falls linearly from peak to peak/(25·10⁴) at the last step
      (t = steps − 1), and β₁ rises back to 0.95.

    Args:
        optimizer: an optimiser whose groups have ``lr`` (and ``betas``, if ``cycle_beta1``).
        peak_lr: the maximum learning rate.
        total_steps: steps of the whole run (≥ 1).
        warmup_steps: W, in [0, total_steps).
        cycle_beta1: cycle β₁ between 0.95 and 0.85 as ``OneCycleLR`` does by default.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int,
        *,
        cycle_beta1: bool = True,
        last_epoch: int = -1,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be ≥ 1, got {total_steps}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}"
            )
        self.peak_lr = peak_lr
        self.start_lr = peak_lr / 25.0
        self.final_lr = self.start_lr / 1e4
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.cycle_beta1 = cycle_beta1
        super().__init__(optimizer, last_epoch)

    def _position(self) -> tuple[float, float]:
        """(learning rate, β₁) at step ``self.last_epoch``."""
        t, w = self.last_epoch, self.warmup_steps
        if t < w:
            frac = t / w
            return self.start_lr + (self.peak_lr - self.start_lr) * frac, 0.95 - 0.1 * frac
        frac = min(1.0, (t - w) / max(self.total_steps - 1 - w, 1))
        return self.peak_lr + (self.final_lr - self.peak_lr) * frac, 0.85 + 0.1 * frac

    def get_lr(self) -> list[float]:  # type: ignore[override]
        lr, beta1 = self._position()
        if self.cycle_beta1:
            for group in self.optimizer.param_groups:
                if "betas" in group:
                    group["betas"] = (beta1, group["betas"][1])
        return [lr for _ in self.optimizer.param_groups]
