"""The tutorial's training loop in plain PyTorch: the reference dynnet is checked and timed against.

Same math, seeding and order of operations as the tutorial (torch.manual_seed and random.seed with one
seed, five randn(()) parameters, a degree drawn with random.randint at every step, SGD with momentum),
written out as one function so tests and the benchmark can run it as a script.

    python scripts/plain_loop.py --seed 0 --steps 30000
"""

import argparse
import math
import random
import time

import torch


def train(
    seed: int,
    steps: int,
    n_points: int = 2000,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    cache_powers: bool = False,
    lr: float = 1e-8,
) -> list[float]:
    torch.manual_seed(seed)
    random.seed(seed)
    a, b, c, d, e = (torch.nn.Parameter(torch.randn(()).to(device, dtype)) for _ in range(5))
    x = torch.linspace(-math.pi, math.pi, n_points)
    x, y = x.to(device, dtype), torch.sin(x).to(device, dtype)
    optimizer = torch.optim.SGD([a, b, c, d, e], lr=lr, momentum=0.9)
    # x**p is the same at every step: computed once it gives the same numbers with fewer operations (dynnet does).
    powers = [x**p for p in range(6)]

    def power(p: int) -> torch.Tensor:
        return powers[p] if cache_powers else x**p

    for _ in range(steps):
        prediction = a + b * x + c * power(2) + d * power(3)
        for p in range(4, random.randint(4, 6)):  # 4, 5 or 6: no, one or two shared terms
            prediction = prediction + e * power(p)
        loss = torch.nn.functional.mse_loss(prediction, y, reduction="sum")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device != "cpu":
        torch.cuda.synchronize()
    return [p.item() for p in (a, b, c, d, e)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30000)
    parser.add_argument("--n-points", type=int, default=2000)
    parser.add_argument("--float64", action="store_true", help="train in float64 (the data is made in float32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lr", type=float, default=1e-8)
    parser.add_argument("--cache-powers", action="store_true", help="compute x**p once, as dynnet does")
    args = parser.parse_args()
    dtype = torch.float64 if args.float64 else torch.float32
    start = time.perf_counter()
    a, b, c, d, e = train(args.seed, args.steps, args.n_points, dtype, args.device, args.cache_powers, args.lr)
    seconds = time.perf_counter() - start
    print(f"Result: y = {a} + {b} x + {c} x^2 + {d} x^3 + {e} x^4 ? + {e} x^5 ?")
    print(f"Seconds: {seconds} for {args.steps} steps")


if __name__ == "__main__":
    main()
