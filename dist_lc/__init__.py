"""dist_lc: distributed training of land-cover proportion models on Sentinel-2 tiles."""

__version__ = "0.1.0"
