"""Whether a run compiles its network (``train.compile``), given what torch.compile needs on the node.

torch.compile builds its kernels on the node that trains: Triton's (CUDA) with a C compiler,
inductor's CPU kernels with a C++ compiler. A cluster's compute nodes do not always have one, and
``auto`` must not turn a run that would train eager into a failure there: it trains eager and says
why. An explicit ``true`` without the compiler is refused before anything starts.
"""
from __future__ import annotations

import os
import shutil
import sysconfig

import torch

from lc_common.errors import InputError, first_sentence

from . import distributed


def compiles(setting, device: torch.device) -> bool:
    """train.compile: ``auto`` compiles on CUDA only (on a CPU its compile time is not paid back)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def missing_compiler(device: torch.device) -> str | None:
    """What torch.compile would lack on this node to build its kernels for ``device``, or None."""
    if device.type == "cuda":
        return _missing_for_triton()
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except (ImportError, AttributeError):   # another torch's layout: let the compilation say it
        return None
    except Exception as exc:   # inductor's InvalidCxxCompiler
        return f"no working C++ compiler on this node ({first_sentence(exc)}), which inductor's CPU kernels need"
    return None


def _missing_for_triton() -> str | None:
    """Triton builds its launchers as Python extensions: with $CC, else gcc, else clang, against the
    Python headers of the interpreter (which a node's system Python may lack: python3-devel)."""
    cc = os.environ.get("CC")
    if cc is not None and not shutil.which(cc):
        return f"$CC ({cc!r}) is not a compiler on this node, which Triton needs to build its CUDA kernels"
    if cc is None and not (shutil.which("gcc") or shutil.which("clang")):
        return "no C compiler on this node ($CC, gcc or clang), which Triton needs to build its CUDA kernels"
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return (f"no Python headers on this node ({include}/Python.h: python3-devel or python3-dev), which "
                "Triton needs to build its CUDA kernels")
    return None


def agreed_compile(setting, device: torch.device, sync_batchnorm: bool = False) -> tuple[bool, str | None]:
    """(whether to compile, a note for the run's log), the same on every rank (a collective: every
    rank calls it). Where a rank's node lacks what torch.compile needs, ``auto`` trains eager on
    every rank, said in the note, and ``true`` is an InputError on every rank (none waits for one
    that stopped). ``sync_batchnorm`` (a distributed run's SyncBatchNorm layers): ``auto`` trains
    eager, since dynamo breaks the graph at each of them (the fusions around every normalisation, what
    compiling gains here, are lost, and CUDA graphs are cut into pieces)."""
    if not compiles(setting, device):
        return False, None
    if setting == "auto" and sync_batchnorm:   # the same on every rank: no collective needed
        return False, ("train.compile auto: training eager, train.sync_batchnorm: torch.compile breaks its graph "
                       "at every SyncBatchNorm (train.compile=true compiles anyway)")
    said = distributed.all_gather_objects(missing_compiler(device))
    lacking = [(rank, why) for rank, why in enumerate(said) if why]
    if not lacking:
        return True, None
    rank, why = lacking[0]
    why = f"rank {rank}: {why}" if len(said) > 1 else why
    if setting == "auto":
        return False, f"train.compile auto: training eager, {why}"
    raise InputError(f"config key 'train.compile': true, but {why}; install it (or point $CC/$CXX at a compiler), "
                     "or set train.compile=false")
