"""Fault injection for the tests, never part of the product: a test puts this folder on PYTHONPATH
and sets DIST_LC_TEST_FAULT, and every Python process it starts (torchrun ranks, submitit jobs)
loads this module at start-up and wraps one trainer function.

    DIST_LC_TEST_FAULT="ACTION step=N [rank=R] [marker=PATH]"
    DIST_LC_TEST_FAULT="hang-loader epoch=E [rank=R]"
    DIST_LC_TEST_FAULT="disk-full file=NAME [nth=N] [marker=PATH]"
    DIST_LC_TEST_FAULT="kill-reader [nth=N] [marker=PATH]"
    DIST_LC_TEST_FAULT="map-raise|map-kill nth=N [rank=R]" or "map-nan [rank=R]"

``disk-full``: the N-th atomic write (default the first) of a file called NAME fails with ENOSPC
when it is synced, as on a full disk.

``kill-reader``: the N-th tile (default the first) that a reader process of ``lc-shard pack``
surveys kills that reader (SIGKILL, as the kernel's out-of-memory killer would).

``map-raise nth=N`` / ``map-kill nth=N`` / ``map-nan`` (``[rank=R]``): in ``dist-lc map``, the N-th
window row this process predicts raises RuntimeError / SIGKILLs the process; or every probability
the ensemble gives is NaN (an overflow).

``hang-loader``: the loader workers of rank R block forever (as in a read that never returns) when
they start the training pass of epoch E (0-based), so the rank waits for data that never comes.

ACTION, after the N-th optimizer step of this process (on rank R only, if given):
- ``kill``: SIGKILL itself;
- ``raise``: raise RuntimeError (an exception in one rank only);
- ``raise-peers-hang``: rank R raises as with ``raise``; every other rank sleeps forever instead
  (a task that never notices the failure: only its executor can end it);
- ``term-in-save`` / ``kill-in-save``: at the next checkpoint write, SIGTERM its process group /
  SIGKILL itself halfway through writing the temporary file.
With ``marker``, the fault fires once across processes: only the process that creates PATH acts.
"""
import os
import sys

SPEC = os.environ.get("DIST_LC_TEST_FAULT")


def after_import(name: str, patch) -> None:
    """``patch(module)`` once the module ``name`` is imported (at once if it is): a process that
    never imports it (a submitit controller, multiprocessing's resource tracker, the cv launcher)
    is not made to import torch for a fault it cannot hit."""
    if name in sys.modules:
        patch(sys.modules[name])
        return
    import importlib.abc

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            for finder in sys.meta_path:
                spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None:
                    break
            else:
                return None
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


if SPEC:
    import signal

    action, *pairs = SPEC.split()
    opts = dict(p.split("=", 1) for p in pairs)
    at, only_rank, marker = int(opts.get("step", 0)), opts.get("rank"), opts.get("marker")
    state = {"steps": 0, "armed": False}

    def _my_turn() -> bool:
        if only_rank is not None and os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0"))) != only_rank:
            return False
        if marker:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return False
        return True

    real = {}

    def optimizer_step(*args, **kwargs):
        out = real["step"](*args, **kwargs)
        state["steps"] += 1
        if state["steps"] == at and action == "raise-peers-hang" and not _my_turn():
            import time

            while True:
                time.sleep(3600)
        if state["steps"] == at and _my_turn():
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif action in ("raise", "raise-peers-hang"):
                raise RuntimeError(f"injected fault after step {at}")
            else:
                state["armed"] = True
        return out

    def save_atomic(state_dict, path):
        if not state["armed"]:
            return real["save"](state_dict, path)
        state["armed"] = False
        import torch

        real_save = torch.save

        def half_then_fault(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            f.flush()
            f.truncate(f.tell() // 2)   # as if the signal came halfway through the write
            if action == "kill-in-save":
                os.kill(os.getpid(), signal.SIGKILL)
            os.killpg(os.getpgid(0), signal.SIGTERM)
            f.seek(0)
            real_save(obj, f, *a, **k)  # TERM only asks to stop: the write completes

        torch.save = half_then_fault
        try:
            return real["save"](state_dict, path)
        finally:
            torch.save = real_save

    def wrap_trainer(train_module) -> None:   # dist_lc.train imports dist_lc.checkpoint first
        checkpoint = sys.modules["dist_lc.checkpoint"]
        real.update(step=train_module.optimizer_step, save=checkpoint.save_atomic)
        train_module.optimizer_step, checkpoint.save_atomic = optimizer_step, save_atomic

    after_import("dist_lc.train", wrap_trainer)

    if action == "disk-full":
        import errno

        _fsync, writes = os.fsync, {"n": 0}

        def fsync(fd):
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            if name.startswith(f".{opts['file']}."):   # the temporary name of an atomic write
                writes["n"] += 1
                if writes["n"] == int(opts.get("nth", 1)) and _my_turn():
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return _fsync(fd)

        os.fsync = fsync

    if action == "hang-loader":
        import time

        def hang_loader(data) -> None:
            from torch.utils.data import get_worker_info

            _iter = data.ShardStream.__iter__

            def hanging_iter(self):
                if self.train and get_worker_info() is not None and self.epoch >= int(opts["epoch"]) and \
                        (only_rank is None or str(self.rank) == only_rank):
                    while True:
                        time.sleep(3600)
                return _iter(self)

            data.ShardStream.__iter__ = hanging_iter

        after_import("dist_lc.data", hang_loader)

    if action == "kill-reader":
        import multiprocessing

        surveyed = {"n": 0}

        def survey_tile(tile):   # module-level: the pool pickles it by name, as sitecustomize.survey_tile
            if multiprocessing.current_process().name != "MainProcess":   # a reader of the pool
                surveyed["n"] += 1
                if surveyed["n"] == int(opts.get("nth", 1)) and _my_turn():
                    os.kill(os.getpid(), signal.SIGKILL)
            if "survey" not in real:
                import shard_tools.pack   # noqa: F401  (a reader unpickles this function first: the hook fills it)
            return real["survey"](tile)

        def kill_reader(pack) -> None:
            real["survey"], pack.survey_tile = pack.survey_tile, survey_tile

        after_import("shard_tools.pack", kill_reader)

    if action in ("map-raise", "map-kill"):
        rows = {"n": 0}

        def faulty_rows(mapping) -> None:
            real_rows = mapping.row_probabilities

            def row_probabilities(*args, **kwargs):
                rows["n"] += 1
                if rows["n"] == int(opts.get("nth", 1)) and _my_turn():
                    if action == "map-kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise RuntimeError("injected fault in a window row")
                return real_rows(*args, **kwargs)

            mapping.row_probabilities = row_probabilities

        after_import("dist_lc.mapping", faulty_rows)

    if action == "map-nan":
        def nan_probabilities(predict) -> None:
            call = predict.Ensemble.__call__

            def nan_call(self, image, pixels=False, **kwargs):
                out = call(self, image, pixels=pixels, **kwargs)
                return (out[0], out[1] * float("nan")) if pixels and _my_turn() else out

            predict.Ensemble.__call__ = nan_call

        after_import("dist_lc.predict", nan_probabilities)
