"""What the CV report's calibration fit costs a fresh process (as the report's is): the shipped
``dist_lc.calibration.fit`` (scipy's L-BFGS on the exact gradient) against the fit before (torch's
LBFGS with a strong-Wolfe line search, whose first use imports torch's compiler), each in its own
process, interleaved, on out-of-fold-sized random proportions; both reach the same parameters
(checked here to 1e-4)::

    python benchmarks/calibration_fit.py [--rounds 5] [--tiles 15000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, print_interleaved  # noqa: E402

CHILD = r"""
import json, sys, time
import numpy as np
import torch
from dist_lc import calibration
from dist_lc.metrics import EPSILON, has_scored_class, scored_proportions


def fit_before(truth, pred, l2=calibration.L2):
    y, p = scored_proportions(truth), scored_proportions(pred)
    keep = has_scored_class(truth) & np.isfinite(p).all(axis=1)
    y = torch.as_tensor(y[keep] + EPSILON, dtype=torch.float64)
    y = y / y.sum(dim=1, keepdim=True)
    z = torch.as_tensor(np.log(p[keep] + EPSILON), dtype=torch.float64)
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_scale, bias], lr=1.0, max_iter=200, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        logq = torch.log_softmax(log_scale.exp() * z + bias, dim=1)
        loss = (y * (y.log() - logq)).sum(dim=1).mean() + l2 * (log_scale ** 2 + (bias ** 2).sum())
        loss.backward()
        return loss

    opt.step(objective)
    return calibration.Calibration(float(log_scale.detach().exp()), [float(b) for b in bias.detach()])


rng = np.random.default_rng(0)
n = int(sys.argv[2])
truth = rng.dirichlet(np.full(10, 0.3), n)
pred = 0.5 * truth + 0.5 * rng.dirichlet(np.ones(10), n)
pred[:, 4] *= 2.5
started = time.perf_counter()
cal = (fit_before if sys.argv[1] == "before" else calibration.fit)(truth, pred)
print(json.dumps({"s": time.perf_counter() - started, "params": [cal.scale, *cal.bias]}))
"""


def one_fit(variant: str, tiles: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, variant, str(tiles)], cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"calibration_fit: the {variant} process failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tiles", type=int, default=15000, help="out-of-fold tiles (the challenge's: 18,491)")
    ap.add_argument("--quick", action="store_true", help="one round on 500 tiles (a smoke run)")
    args = ap.parse_args(argv)
    rounds, tiles = (1, 500) if args.quick else (args.rounds, args.tiles)
    seconds, params = {"before": [], "shipped": []}, {}
    for _ in range(rounds):
        for variant in seconds:
            result = one_fit(variant, tiles)
            seconds[variant].append(result["s"])
            params[variant] = result["params"]
    apart = max(abs(a - b) for a, b in zip(params["before"], params["shipped"]))
    if apart > 1e-4:
        raise SystemExit(f"calibration_fit: the two fits differ by {apart:.2g} in a parameter")
    print_interleaved(f"{tiles} tiles, a fresh process per fit, {rounds} round(s), interleaved",
                      "first fit in a process", seconds)
    print(f"largest parameter difference: {apart:.1g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
