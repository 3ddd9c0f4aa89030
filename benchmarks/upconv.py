"""The U-Net's transposed convolution: the padded-kernel form dist_lc uses against the cropped definition.

Both compute Keras' ``Conv2DTranspose(3, strides=2, padding='same')`` (see ``dist_lc.model.UpConv``):

- *crop*: ``ConvTranspose2d(k=3, stride=2)`` (2H+1 rows) then ``[..., :2H, :2W]``;
- *padded*: the 3×3 kernel zero-padded to 4×4 at the top/left, ``conv_transpose2d(stride=2, padding=1)``.

Forward + backward of each UpConv layer of the benchmark U-Net (width 64, micro-batch 8, 256² tiles),
both forms interleaved in the same run, bf16 autocast and fp32, channels_last and NCHW::

    python benchmarks/upconv.py [--repeats 5] [--batch 8] [--md docs/BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, machine_line, median, table  # noqa: E402

# (input side, channels) of the benchmark U-Net's three UpConv layers at 256² input (num_layers=2)
LAYERS = [(32, 64), (64, 64), (128, 64)]


def crop_form(x, w, b):
    h, wd = x.shape[-2:]
    return F.conv_transpose2d(x, w, b, stride=2)[..., : 2 * h, : 2 * wd]


def padded_form(x, w, b):
    return F.conv_transpose2d(x, F.pad(w, (1, 0, 1, 0)), b, stride=2, padding=1)


def time_once(fn, x, w, b, dtype) -> float:
    x = x.detach().requires_grad_()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = fn(x, w, b)
    out.float().square().mean().backward()
    return time.perf_counter() - t0


def measure(side, ch, batch, dtype, fmt, repeats) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, ch, side, side).contiguous(memory_format=fmt)
    w = torch.randn(ch, ch, 3, 3, requires_grad=True)
    b = torch.zeros(ch, requires_grad=True)
    with torch.no_grad():
        diff = (crop_form(x, w, b) - padded_form(x, w, b)).abs().max().item()
    times = {"crop": [], "padded": []}
    for fn in (crop_form, padded_form):   # warm-up
        time_once(fn, x, w, b, dtype)
    for _ in range(repeats):
        for name, fn in (("crop", crop_form), ("padded", padded_form)):
            times[name].append(time_once(fn, x, w, b, dtype))
    return {"crop_ms": 1e3 * median(times["crop"]), "padded_ms": 1e3 * median(times["padded"]), "max_abs_diff": diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--md", type=Path, help="append the table to this markdown file")
    ap.add_argument("--quick", action="store_true", help="1 repeat, batch 1, layers of an eighth the side "
                    "(a smoke run)")
    args = ap.parse_args(argv)
    layers = LAYERS
    if args.quick:
        args.repeats, args.batch = 1, 1
        layers = [(side // 8, ch) for side, ch in LAYERS]
    rows = []
    for dtype, fmt in ((torch.bfloat16, torch.channels_last), (None, torch.channels_last),
                       (torch.bfloat16, torch.contiguous_format), (None, torch.contiguous_format)):
        for side, ch in layers:
            log(f"{dtype} {fmt} {side}² × {ch}")
            r = measure(side, ch, args.batch, dtype, fmt, args.repeats)
            rows.append(["bf16" if dtype else "fp32", "NHWC" if fmt == torch.channels_last else "NCHW",
                         f"{side}² → {2 * side}²", f"{r['crop_ms']:.0f}", f"{r['padded_ms']:.0f}",
                         f"{r['crop_ms'] / r['padded_ms']:.2f}×", f"{r['max_abs_diff']:.1e}"])
    text = (f"Command: `python benchmarks/upconv.py {' '.join(sys.argv[1:] if argv is None else argv)}`  \n"
            f"Machine: {machine_line()}; {torch.get_num_threads()} threads, batch {args.batch}, {LAYERS[0][1]} "
            f"channels, median of {args.repeats} (forward + backward)\n\n"
            + table(["precision", "layout", "layer", "crop ms", "padded ms", "speed-up", "max |diff| fwd"], rows,
                    "lllrrrr") + "\n")
    print(text)
    if args.md:
        with open(args.md, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
