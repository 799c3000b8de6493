"""Launchers of the C++ / OpenMP kernels (csrc/cpu, compiled into ``fastdiff._C_cpu``): ``step`` and
``groupnorm``."""
