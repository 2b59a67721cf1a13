"""When do two computations of the same blocks agree? Tolerances for result checks.

Honest providers do not produce bit-identical activations: kernels, thread counts, batch
shapes and GPUs change the order of floating-point sums. A check must accept that noise
and still catch a provider that skips work or perturbs its outputs. Outputs ``a`` (the
provider's) and ``b`` (a recomputation) match when

    max |a - b|  <=  atol + rtol * max |b|

with (atol, rtol) per dtype below. Calibration, measured on CPU with generated llama
models (hidden 128 x 4 blocks and 512 x 8 blocks, a batch of 4 x 32 tokens), as the
largest difference relative to max |reference| against an fp32 reference:
- fp32, batch of 4 versus one sequence at a time: 0 (bit-identical here; across devices
  expect about 1e-5);
- fp16 weights and activations: 1.9e-3 to 2.0e-3;
- bf16 (8 bits of mantissa, so one rounding step is 3.9e-3): 1.75e-2 to 1.76e-2;
- for scale, Gaussian noise of 1% of max |reference| added to the output: 3.9e-2 to 4.3e-2.
The tolerances leave 5x headroom for fp16 and 2x for bf16, so noise of 1% is caught in
every dtype. A smaller perturbation hides inside bf16's own noise; the top-k commitments
of TOPLOC (see PRIOR_ART.md) would tighten this and are not implemented.

A maximum rather than a mean: a cheater that changes a few positions must not hide in the
average. Non-finite values never match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["TOLERANCES", "OutputComparison", "compare_outputs"]

# dtype name -> (atol, rtol)
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-5, 1e-3),
    "float16": (1e-4, 1e-2),
    "bfloat16": (1e-3, 3.5e-2),
}


class OutputComparison:
    """The outcome of comparing a claimed output with a reference computation."""

    def __init__(self, *, matches: bool, max_abs_diff: float, allowed: float, dtype: str) -> None:
        self.matches, self.max_abs_diff, self.allowed, self.dtype = matches, max_abs_diff, allowed, dtype

    def __bool__(self) -> bool:
        return self.matches

    def __repr__(self) -> str:
        verdict = "match" if self.matches else "MISMATCH"
        return f"OutputComparison({verdict}, max_abs_diff={self.max_abs_diff:.3g}, allowed={self.allowed:.3g}, {self.dtype})"


def compare_outputs(claimed: torch.Tensor, reference: torch.Tensor, *, dtype: str | None = None) -> OutputComparison:
    """Compare ``claimed`` with ``reference`` under the tolerance of ``dtype`` (by default the
    lower precision of the two tensors). Shapes must agree; a shape mismatch never matches."""
    import torch

    name = dtype or _lower_precision(claimed.dtype, reference.dtype)
    if name not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {name}; expected one of {sorted(TOLERANCES)}")
    atol, rtol = TOLERANCES[name]
    if claimed.shape != reference.shape:
        return OutputComparison(matches=False, max_abs_diff=float("inf"), allowed=atol, dtype=name)
    a, b = claimed.detach().float().cpu(), reference.detach().float().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return OutputComparison(matches=False, max_abs_diff=float("inf"), allowed=atol, dtype=name)
    allowed = atol + rtol * float(b.abs().max()) if b.numel() else atol
    max_diff = float((a - b).abs().max()) if a.numel() else 0.0
    return OutputComparison(matches=max_diff <= allowed, max_abs_diff=max_diff, allowed=allowed, dtype=name)


def _lower_precision(*dtypes: torch.dtype) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    for name in ("bfloat16", "float16", "float32"):
        if name in names:
            return name
    return names[0]
