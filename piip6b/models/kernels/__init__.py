"""Optional fused GPU kernels.

Nothing here is imported by `piip6b.models` at import time: each kernel module imports `triton`
itself and is loaded lazily by the code that dispatches to it (e.g. `deform_attn.resolve_kernel`),
so CPU and `meta` use never need Triton.
"""
