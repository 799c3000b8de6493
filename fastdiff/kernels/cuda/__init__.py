"""Launchers of the CUDA C++ kernels (csrc/cuda, compiled into ``fastdiff._C_cuda``): ``step`` and ``groupnorm``.
Importing them needs no GPU; calling them does."""
