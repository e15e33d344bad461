"""Triton device code for kanfast (installed as ``kanfast.kernels``)."""
