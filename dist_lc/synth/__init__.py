"""Synthetic land-cover tiles in the challenge's layout, for the demo and for tests.

:func:`dist_lc.synth.generate.generate` writes ``train/images``, ``train/masks``, ``test/images``
and ``train_labels.csv``; the spectral and frequency constants it uses are estimated from real
tiles by :mod:`dist_lc.synth.derive_constants` and shipped as ``constants.json``.
"""
