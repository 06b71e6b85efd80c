"""How much Lightning costs: dynnet against the plain tutorial loop, end to end and per step.

Runs every measurement as a fresh process, alternating dynnet and the plain loop, after one untimed
warm-up of each, and reports the median and the spread (min-max) over --repeats runs:

- end to end: `dynnet fit -c configs/default.yaml` against scripts/plain_loop.py (the tutorial's script),
  wall time and peak resident memory of the process;
- per step: the slope of training time against step count (two runs of different lengths, so start-up,
  imports and one-off warm-up cancel) for dynnet with the default config (logging, checkpoints, validation
  and progress display on) and for the plain loop with identical math (x**p cached, as dynnet does), at each
  --sizes n_points; the difference is Lightning's cost per optimizer step;
- large: one fit of --large points for 2 steps, wall time and peak resident memory (the test suite checks
  only its memory, which does not depend on the machine's load).

Writes results.json and scaling.png (results-gpu.json and scaling-gpu.png on a GPU) into the folder --out names;
benchmark/ holds the figures docs/performance.md shows.

    python scripts/benchmark.py --out /tmp/bench                     # CPU, about 15 minutes on 2 cores
    python scripts/benchmark.py --out /tmp/bench --accelerator gpu   # the same on the first GPU
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PLAIN = [sys.executable, str(ROOT / "scripts" / "plain_loop.py")]
DYNNET = [sys.executable, "-m", "dynnet", "fit", "-c", str(ROOT / "configs" / "default.yaml")]


def run(command: list[str]) -> tuple[str, float, float]:
    """Run command; return its stdout, wall seconds and peak resident memory in MiB."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)  # the child's own rusage, peak memory included
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if process.returncode:
            sys.exit(f"benchmark: {' '.join(command)} failed:\n{err.read()[-2000:]}")
        return out.read(), seconds, usage.ru_maxrss / 1024


def train_seconds(kind: str, steps: int, n_points: int, device: str) -> float:
    """Seconds spent training (start-up excluded) for one run of `kind` ("dynnet" or "plain")."""
    lr = str(1e-8 * 2000 / n_points)  # the loss is a sum over points: keep the tutorial's step size per point
    if kind == "plain":
        size = ["--steps", str(steps), "--n-points", str(n_points), "--lr", lr]
        out, _, _ = run([*PLAIN, *size, "--device", device, "--cache-powers"])
        return float(re.search(r"^Seconds: (\S+)", out, re.M).group(1))
    accelerator = "gpu" if device == "cuda" else "cpu"
    size = ["--trainer.max_steps", str(steps), "--data.n_points", str(n_points), "--optimizer.lr", lr]
    with tempfile.TemporaryDirectory() as root:
        out, _, _ = run([*DYNNET, *size, "--trainer.accelerator", accelerator, "--trainer.default_root_dir", root])
    return float(re.search(r"^Trained \d+ steps in (\S+) s", out, re.M).group(1))


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=float, nargs="+", default=[2e3, 2e4, 2e5, 2e6])
    parser.add_argument("--large", type=float, default=1e8, help="points of the large fit (0: skip it)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and scaling.png")
    args = parser.parse_args()
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmark: --accelerator gpu, but torch sees no CUDA device")

    print("warm-up ...", flush=True)
    run([*PLAIN, "--steps", "10"])
    train_seconds("dynnet", 10, 2000, device)

    results = {"machine": _machine(device), "end_to_end": {}, "per_step_us": {}}
    walls = {"dynnet": [], "plain": []}
    rss = {"dynnet": [], "plain": []}
    accelerator = ["--trainer.accelerator", args.accelerator]
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as root:
            commands = {
                "dynnet": [*DYNNET, *accelerator, "--trainer.default_root_dir", root],
                "plain": [*PLAIN, "--steps", "30000", "--device", device],
            }
            for kind, command in commands.items():
                _, seconds, peak = run(command)
                walls[kind].append(seconds)
                rss[kind].append(peak)
        print(f"end to end: dynnet {walls['dynnet'][-1]:.2f} s, plain {walls['plain'][-1]:.2f} s", flush=True)
    results["end_to_end"] = {
        "dynnet_s": spread(walls["dynnet"]),
        "plain_s": spread(walls["plain"]),
        "ratio": spread([d / p for d, p in zip(walls["dynnet"], walls["plain"])]),
        "dynnet_peak_rss_mib": spread(rss["dynnet"]),
        "plain_peak_rss_mib": spread(rss["plain"]),
    }

    for size in (int(s) for s in args.sizes):
        # The longer run takes about 4 s (a step costs roughly 500 us + 15 ns a point on 2 cores), the shorter a
        # fifth of that: long enough that the slope between them is not noise.
        long = max(50, int(4 / (5e-4 + 1.5e-8 * size)))
        short = long // 5
        per_step = {"dynnet": [], "plain": []}
        for _ in range(args.repeats):
            for kind in per_step:
                slope = (train_seconds(kind, long, size, device) - train_seconds(kind, short, size, device)) / (
                    long - short
                )
                per_step[kind].append(slope * 1e6)
        ratio = [d / p for d, p in zip(per_step["dynnet"], per_step["plain"])]
        results["per_step_us"][size] = {
            "dynnet": spread(per_step["dynnet"]),
            "plain": spread(per_step["plain"]),
            "ratio": spread(ratio),
        }
        print(
            f"n_points {size}: dynnet {statistics.median(per_step['dynnet']):.1f} us/step, "
            f"plain {statistics.median(per_step['plain']):.1f} us/step",
            flush=True,
        )

    if args.large:
        with tempfile.TemporaryDirectory() as root:
            large = ["--data.n_points", str(int(args.large)), "--trainer.max_steps", "2", "--trainer.default_root_dir"]
            _, seconds, peak = run([*DYNNET, *accelerator, *large, root])
        results["large"] = {"n_points": int(args.large), "seconds": seconds, "peak_rss_mib": peak}
        print(f"{int(args.large)} points, 2 steps: {seconds:.1f} s, peak {peak / 1024:.1f} GiB", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device == "cpu" else "-gpu"
    (args.out / f"results{suffix}.json").write_text(json.dumps(results, indent=2))
    print(_table(results))
    _plot(results, args.out / f"scaling{suffix}.png")


def _machine(device: str) -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }


def _fmt(s: dict, unit: str = "") -> str:
    return f"{s['median']:.3g}{unit} ({s['min']:.3g}-{s['max']:.3g})"


def _table(results: dict) -> str:
    e2e = results["end_to_end"]
    lines = [
        "| measurement | dynnet | plain loop | ratio | dynnet's cost over the plain loop |",
        "|---|---|---|---|---|",
        f"| end to end, default config (30000 steps) | {_fmt(e2e['dynnet_s'], ' s')} | {_fmt(e2e['plain_s'], ' s')} "
        f"| {_fmt(e2e['ratio'])} | {e2e['dynnet_s']['median'] - e2e['plain_s']['median']:.2f} s |",
        f"| peak resident memory | {_fmt(e2e['dynnet_peak_rss_mib'], ' MiB')} | "
        f"{_fmt(e2e['plain_peak_rss_mib'], ' MiB')} | | |",
    ]
    for size, row in results["per_step_us"].items():
        overhead = row["dynnet"]["median"] - row["plain"]["median"]
        lines.append(
            f"| per step, n_points={size} | {_fmt(row['dynnet'], ' µs')} | {_fmt(row['plain'], ' µs')} | "
            f"{_fmt(row['ratio'])} | {overhead:.0f} µs a step |"
        )
    if "large" in results:
        large = results["large"]
        lines.append(
            f"| {large['n_points']:.0e} points, 2 steps | {large['seconds']:.1f} s, peak "
            f"{large['peak_rss_mib'] / 1024:.1f} GiB | | | |"
        )
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    sizes = [int(s) for s in results["per_step_us"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in ("dynnet", "plain"):
        rows = [results["per_step_us"][s][kind] for s in results["per_step_us"]]
        medians = [r["median"] for r in rows]
        spread = [[m - r["min"] for m, r in zip(medians, rows)], [r["max"] - m for m, r in zip(medians, rows)]]
        # The bars span the fastest and slowest of the repeats: timings on a shared machine vary.
        ax.errorbar(sizes, medians, yerr=spread, fmt="o-", capsize=4, label=f"{kind} (median, min-max)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n_points")
    ax.set_ylabel("µs per optimizer step")
    ax.set_title(f"cost per step on {results['machine']['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
