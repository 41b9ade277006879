"""Kernels: backends that execute tensor-product descriptors behind one registry:
``reference`` (pure torch, the oracle), ``torch`` (the fused CPU fast path) and
``triton`` (CUDA, also runnable under ``TRITON_INTERPRET=1``). Triton is imported
lazily, only inside the triton backend.
"""

__all__: list[str] = []
