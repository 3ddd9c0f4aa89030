"""dist_lc: distributed training of land-cover proportion models on Sentinel-2 tiles."""
import atexit as _atexit
import gc as _gc

__version__ = "0.1.0"

# At exit the interpreter's last garbage collections walk every object torch made (about a second
# per process: each rank, fold job and CLI call paid it; loader workers leave through os._exit).
# Everything this package writes is closed explicitly before that, so the objects still alive are
# left to the OS. Registered at import, this runs after the exit handlers registered later
# (multiprocessing's, logging's, ...).
_atexit.register(_gc.freeze)
