"""The tutorial's random-depth polynomial with one shared weight, as a plain ``nn.Module``."""

import random
import string

import torch
from torch import Tensor, nn

# Coefficients are named a, b, c, ... as in the tutorial's Result line; the last letter is the shared one.
MAX_MIN_DEGREE = len(string.ascii_lowercase) - 2
# x**p for p up to max_degree is computed at every step; beyond 100 every dtype overflows for |x| > 1.2 or
# underflows below, so a larger degree is a mistake (or a crafted checkpoint), never a model.
MAX_DEGREE = 100
# The tutorial's optimizer for this model, in LightningCLI's form: what DynamicNet trains with unless something
# configures another, and what `dynnet fit` and dynnet-sweep use when a config names none.
TUTORIAL_OPTIMIZER = {"class_path": "torch.optim.SGD", "init_args": {"lr": 1e-8, "momentum": 0.9}}


class DynamicPolynomial(nn.Module):
    """y = c_0 + c_1 x + ... + c_m x^m + s x^(m+1) + ... + s x^k, with k drawn uniformly from [m, M] per call.

    m is ``min_degree`` and M is ``max_degree``: every power above m shares the one coefficient s.
    """

    def __init__(self, min_degree: int = 3, max_degree: int = 5) -> None:
        super().__init__()
        for name, value in (("min_degree", min_degree), ("max_degree", max_degree)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if not 0 <= min_degree <= MAX_MIN_DEGREE:
            raise ValueError(f"min_degree must be between 0 and {MAX_MIN_DEGREE}, got {min_degree}")
        if max_degree < min_degree:
            raise ValueError(
                f"min_degree must not exceed max_degree, got min_degree={min_degree} and max_degree={max_degree}"
            )
        if max_degree > MAX_DEGREE:
            raise ValueError(f"max_degree must be at most {MAX_DEGREE}, got {max_degree}")
        self.min_degree = min_degree
        self.max_degree = max_degree
        # One scalar parameter per coefficient, drawn in order with torch.randn(()) as the tutorial does, so a
        # seeded run starts from the tutorial's numbers.
        self.coefficients = nn.ParameterList(torch.randn(()) for _ in range(min_degree + 1))
        self.shared = nn.Parameter(torch.randn(()))
        # The model owns its degree generator: seeded from the run's seed it gives the same draws on every
        # process, and its state travels in checkpoints. random.Random(S).randint(m, M) draws the same
        # sequence as the tutorial's random.seed(S); random.randint(m + 1, M + 1) - 1.
        self.rng = random.Random()

    def draw_degree(self) -> int:
        return self.rng.randint(self.min_degree, self.max_degree)

    def powers(self, x: Tensor) -> list[Tensor]:
        """x**0 ... x**max_degree. They never change for a fixed x, so training computes them once per batch."""
        return [x**p for p in range(self.max_degree + 1)]

    def evaluate(self, powers: list[Tensor], degree: int) -> Tensor:
        """The degree-``degree`` polynomial from precomputed ``powers`` of x."""
        return polynomial(powers, degree, list(self.coefficients), self.shared)

    def at_each_degree(self, x: Tensor) -> dict[int, Tensor]:
        """The polynomial at x for every degree that can be drawn, keyed by degree."""
        powers = self.powers(x)
        return {k: self.evaluate(powers, k) for k in range(self.min_degree, self.max_degree + 1)}

    def expected(self, x: Tensor) -> Tensor:
        """The mean of the polynomial at x over the degrees that can be drawn, each equally likely."""
        return torch.stack(list(self.at_each_degree(x).values())).mean(0)

    def forward(self, x: Tensor, degree: int | None = None) -> Tensor:
        """The polynomial at x, of the given degree, or of a freshly drawn one when ``degree`` is None."""
        return self.evaluate(self.powers(x), self.draw_degree() if degree is None else degree)

    def flat(self) -> Tensor:
        """All coefficients as one vector [c_0, ..., c_m, s]."""
        return torch.stack([*self.coefficients, self.shared])

    def names(self) -> list[str]:
        return list(string.ascii_lowercase[: self.min_degree + 2])

    def describe(self) -> str:
        """One line: the parameters, which powers share one, and the degrees drawn."""
        names = self.names()
        shared = " and ".join(f"x^{p}" for p in range(self.min_degree + 1, self.max_degree + 1))
        sharing = f" ({names[-1]} shared by {shared})" if self.max_degree > self.min_degree + 1 else ""
        return (
            f"DynamicPolynomial, {len(names)} parameters {', '.join(names)}{sharing}, "
            f"degree drawn from {self.min_degree} to {self.max_degree} at every step"
        )

    def formula(self) -> str:
        """The tutorial's Result text: ``y = a + b x + c x^2 + d x^3 + e x^4 ? + e x^5 ?`` with the numbers."""
        values = [c.item() for c in self.coefficients]
        terms = [_term(v, p) for p, v in enumerate(values)]
        terms += [_term(self.shared.item(), p) + " ?" for p in range(self.min_degree + 1, self.max_degree + 1)]
        return "y = " + " + ".join(terms)


def polynomial(powers: list[Tensor], degree: int, coefficients: list[Tensor], shared: Tensor) -> Tensor:
    """c_0 + c_1 x + ... + c_m x^m, plus shared * x^p for each p in (m, degree]: m = len(coefficients) - 1.

    The same operations in the same order as the tutorial, so float32 results match it bit for bit.
    """
    y = coefficients[0]
    for p in range(1, len(coefficients)):
        y = y + coefficients[p] * powers[p]
    for p in range(len(coefficients), degree + 1):
        y = y + shared * powers[p]
    return y.expand_as(powers[0]) if degree == 0 else y  # degree 0 is one number: give it x's shape


def _term(value: float, power: int) -> str:
    return f"{value}" if power == 0 else f"{value} x" if power == 1 else f"{value} x^{power}"


def design(x: Tensor, min_degree: int, max_degree: int) -> Tensor:
    """For each degree k in [min_degree, max_degree], the matrix D_k with D_k @ flat() = the degree-k polynomial.

    Shape (degrees, len(x), min_degree + 2): columns x^0 ... x^m, then the sum of the shared powers up to k.
    """
    powers = x.unsqueeze(-1) ** torch.arange(max_degree + 1, dtype=x.dtype, device=x.device)
    own = powers[:, : min_degree + 1]
    return torch.stack(
        [
            torch.cat([own, powers[:, min_degree + 1 : k + 1].sum(-1, keepdim=True)], -1)
            for k in range(min_degree, max_degree + 1)
        ]
    )


class ExpectedLoss:
    """The expected loss, the sum-reduced squared error averaged over the equally likely degrees, as a quadratic.

    For degree k, |D_k theta - y|^2 = theta' G_k theta - 2 theta' b_k + y'y with G_k = D_k' D_k and b_k = D_k' y.
    The small G_k and b_k are summed over the points once, in float64 and in chunks, so evaluating the loss,
    its minimiser and its curvature costs the same and needs a few kilobytes whatever n_points is.
    """

    CHUNK = 1 << 18  # points per chunk: the chunk's design matrices take about 8 bytes x degrees x 6 x CHUNK

    def __init__(self, x: Tensor, y: Tensor, min_degree: int, max_degree: int) -> None:
        x, y = x.detach().double(), y.detach().double()
        width = min_degree + 2
        self.gram = torch.zeros(max_degree - min_degree + 1, width, width, dtype=torch.float64, device=x.device)
        self.moment = torch.zeros(max_degree - min_degree + 1, width, dtype=torch.float64, device=x.device)
        self.y_norm = torch.zeros((), dtype=torch.float64, device=x.device)
        for xs, ys in zip(x.split(self.CHUNK), y.split(self.CHUNK)):
            matrices = design(xs, min_degree, max_degree)
            self.gram += matrices.transpose(1, 2) @ matrices
            self.moment += matrices.transpose(1, 2) @ ys
            self.y_norm += ys @ ys

    def __call__(self, theta: Tensor) -> Tensor:
        theta = theta.double()
        per_degree = self.gram @ theta @ theta - 2 * self.moment @ theta + self.y_norm
        return per_degree.mean()

    def optimum(self) -> Tensor:
        """The coefficients that minimise the expected loss: where its gradient, mean(G_k) theta - mean(b_k), is 0."""
        return torch.linalg.solve(self.gram.mean(0), self.moment.mean(0))

    def largest_curvature(self) -> float:
        """The largest eigenvalue of any degree's Hessian, 2 G_k: what bounds a stable gradient-descent step."""
        return float(torch.linalg.eigvalsh(2 * self.gram).max())
