"""Sequence-mixing ops of the Palimpsa family: float64 references, torch chunked forms, Triton kernels.

Imports only torch (and triton, lazily, for the GPU kernels).
"""
