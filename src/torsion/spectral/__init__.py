"""Spectral graph learning: Laplacians, batched and sparse eigensolvers, positional
encodings (transforms and sign/basis-invariant encoders such as SignNet and SPE)
and learnable polynomial spectral filters as ``MessagePassing`` layers.
"""

__all__: list[str] = []
