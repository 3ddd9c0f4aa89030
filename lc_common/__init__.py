"""What the shard packer (``shard_tools``) and the trainer (``dist_lc``) share: the tile contract,
the error types, atomic writes, TIFF reading and the machine's usable cores. Imports nothing of
either package."""
