"""Pack the challenge's TIFF tiles into WebDataset shards once; verify and describe them."""

__version__ = "0.1.0"
