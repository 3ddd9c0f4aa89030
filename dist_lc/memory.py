"""Memory: the process's own peak, and the largest micro-batch that fits on a device.

``train.micro_batch_size: auto`` picks, among the divisors of the batch per rank (so the effective
batch stays exactly ``train.batch_size``), the largest micro-batch that fits:

- CUDA: trial forward + backward passes of the real model at the real crop size, from the largest
  candidate down, each out-of-memory error caught and the cache freed;
- CPU: an estimate against ``train.memory_limit_gb`` (default: 80% of the available memory shared by
  the node's ranks): the process's present RSS + parameters, gradients and two optimizer states +
  the micro-batch × the bytes autograd saves for one tile (counted on a one-tile forward) × 2 for
  the backward's temporaries.

Every rank then takes the smallest of the ranks' choices, so they all compute the same layout.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lc_common.tiles import IMAGE_SHAPE

from . import distributed
from .precision import autocast

BACKWARD_FACTOR = 2.0     # peak of forward + backward over what the forward saves (CPU estimate)
AVAILABLE_SHARE = 0.8     # of MemAvailable, when no train.memory_limit_gb is given


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the RSS high-water mark (VmHWM;
    ``ru_maxrss`` would include the peak of a parent, kept across exec)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_kb("VmHWM") / 1024


def _status_kb(field: str, path: str = "/proc/self/status") -> float:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def rss_bytes() -> float:
    return _status_kb("VmRSS") * 1024


def available_bytes() -> float:
    return _status_kb("MemAvailable", "/proc/meminfo") * 1024


def candidates(per_rank: int) -> list[int]:
    """Micro-batches that keep the batch exact: the divisors of the batch per rank, largest first."""
    return [d for d in range(per_rank, 0, -1) if per_rank % d == 0]


@contextlib.contextmanager
def _trial(net: torch.nn.Module):
    """Run trial passes in training mode and leave no trace: buffers (BatchNorm statistics) and
    gradients are as they were before."""
    saved = [b.detach().clone() for b in net.buffers()]
    was_training = net.training
    net.train()
    try:
        yield
    finally:
        for buffer, value in zip(net.buffers(), saved):
            buffer.data.copy_(value)
        net.zero_grad(set_to_none=True)
        net.train(was_training)


def _inputs(n: int, size: int, device, channels_last: bool) -> tuple:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    image = torch.rand(n, 4, size, size, device=device).mul_(3000).contiguous(memory_format=fmt)
    mask = torch.randint(0, 10, (n, size, size), device=device)
    props = torch.full((n, 10), 0.1, device=device)
    return image, mask, props


def saved_bytes_per_tile(net, loss_fn, size: int, device, dtype, channels_last: bool) -> int:
    """Bytes that autograd keeps for the backward of one tile (a one-tile forward, counted)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    image, mask, props = _inputs(1, size, device, channels_last)
    with _trial(net), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(device, dtype):
            logits = net(image)
        loss_fn(logits, mask, props).sum()
    return total[0]


# what cuDNN and cuBLAS raise, as a plain RuntimeError, when no workspace can be allocated: near the
# memory limit a convolution fails so before the caching allocator raises OutOfMemoryError
ALLOCATION_FAILURES = ("unable to find an engine", "CUBLAS_STATUS_ALLOC_FAILED", "NOT_ENOUGH_WORKSPACE")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says that the device ran out of memory, whatever library said it."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(words in str(exc) for words in ALLOCATION_FAILURES)


def _fits_on_cuda(net, loss_fn, n: int, size: int, device, dtype, channels_last: bool) -> bool:
    """Whether a training step of ``n`` tiles at ``size``² fits, and validation's forward pass of ``n``
    whole tiles (no gradients, but at 256²: after a small crop's step, a whole tile can need more)."""
    logits = None
    image, mask, props = _inputs(n, size, device, channels_last)
    try:
        with _trial(net):
            with autocast(device, dtype):
                logits = net(image)
            loss_fn(logits, mask, props).sum().backward()
        logits = image = mask = props = None
        if size < IMAGE_SHAPE[0]:
            image = _inputs(n, IMAGE_SHAPE[0], device, channels_last)[0]
            with _trial(net), torch.no_grad(), autocast(device, dtype):
                logits = net(image)
        torch.cuda.synchronize(device)
        return True
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        return False
    finally:
        # the failed attempt's activations (held by ``logits``'s graph) freed before the cache is
        logits = image = mask = props = None
        torch.cuda.empty_cache()


def fit_micro_batch(net, loss_fn, *, per_rank: int, size: int, device, dtype, channels_last: bool,
                    limit_gb: float | None, local_ranks: int) -> tuple[int, str]:
    """(the largest micro-batch that fits, how it was decided), the same on every rank."""
    options = candidates(per_rank)
    if device.type == "cuda":
        chosen = next((n for n in options if _fits_on_cuda(net, loss_fn, n, size, device, dtype, channels_last)),
                      options[-1])
        how = f"trial steps at {size}² on {torch.cuda.get_device_name(device)}"
        # the trials that ran out of memory filled the GPU: the epochs' peak_mem_mb is training's own
        torch.cuda.reset_peak_memory_stats(device)
    else:
        per_tile = saved_bytes_per_tile(net, loss_fn, size, device, dtype, channels_last) * BACKWARD_FACTOR
        states = sum(p.numel() * p.element_size() for p in net.parameters()) * 4
        budget = limit_gb * 2**30 if limit_gb else AVAILABLE_SHARE * available_bytes() / max(local_ranks, 1)
        room = budget - rss_bytes() - states
        chosen = next((n for n in options if n * per_tile <= room), options[-1])
        how = (f"{per_tile / 2**20:.0f} MB per tile at {size}² against a budget of {budget / 2**30:.1f} GB "
               f"({'train.memory_limit_gb' if limit_gb else 'available memory'})")
    chosen = int(distributed.all_reduce_min(chosen, device))
    return chosen, how
