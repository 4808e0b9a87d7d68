"""Bit-packed binary kernels.

    pack          bit layout (+1 -> 1, -1 -> 0, K contiguous, zero tail) in plain numpy
    reference     plain torch ground truth (binary GEMM, binary conv with +1 padding,
                  folded BatchNorm + sign)
    cpu           numba multi-threaded XNOR-popcount backend (uint64 words)
    triton_kernels  Triton GPU backend (int32 words); import it only after deciding on
                  TRITON_INTERPRET, so it is deliberately not imported here
"""
