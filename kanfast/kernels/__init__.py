"""Device code for kanfast (installed as ``kanfast.kernels``): the fused Triton kernels
(:mod:`.kan_spline`), the Triton basis-block kernels of the wide-layer path (:mod:`.basis_block`)
and the CPU block kernels in C (:mod:`.cpu_spline`, compiled on first use)."""
