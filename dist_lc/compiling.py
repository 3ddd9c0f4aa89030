"""Whether a run compiles its network (``train.compile``), given what torch.compile needs on the node.

torch.compile builds its kernels on the node that trains: Triton's (CUDA) with a C compiler,
inductor's CPU kernels with a C++ compiler. A cluster's compute nodes do not always have one, and
``auto`` must not turn a run that would train eager into a failure there: it trains eager and says
why. An explicit ``true`` without the compiler is refused before anything starts.
"""
from __future__ import annotations

import os
import shutil

import torch

from lc_common.errors import InputError, first_sentence


def compiles(setting, device: torch.device) -> bool:
    """train.compile: ``auto`` compiles on CUDA only (on a CPU its compile time is not paid back)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def missing_compiler(device: torch.device) -> str | None:
    """What torch.compile would lack on this node to build its kernels for ``device``, or None."""
    if device.type == "cuda":   # Triton's own search: $CC, else gcc, else clang
        if os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang"):
            return None
        return "no C compiler on this node ($CC, gcc or clang), which Triton needs to build its CUDA kernels"
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except (ImportError, AttributeError):   # another torch's layout: let the compilation say it
        return None
    except Exception as exc:   # inductor's InvalidCxxCompiler
        return f"no working C++ compiler on this node ({first_sentence(exc)}), which inductor's CPU kernels need"
    return None


def compile_decision(setting, device: torch.device) -> tuple[bool, str | None]:
    """(whether to compile, a note for the run's log). ``auto`` without the compiler it needs trains
    eager, said in the note; ``true`` without it is an InputError."""
    if not compiles(setting, device):
        return False, None
    missing = missing_compiler(device)
    if missing is None:
        return True, None
    if setting == "auto":
        return False, f"train.compile auto: training eager, {missing}"
    raise InputError(f"config key 'train.compile': true, but {missing}; install one (or point $CC/$CXX at it), "
                     "or set train.compile=false")
