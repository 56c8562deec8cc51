"""mm1-moe: mixture-of-experts scaling library for MM1 multimodal LLMs on Megatron-core."""

import os as _os

__version__ = "0.1.0"


def _use_triton_interpreter_without_gpu() -> None:
    """On a machine without a GPU our Triton kernels run in the interpreter. TRITON_INTERPRET
    must be set before triton is first imported (Megatron imports it too, and kernels decorated
    before the switch fail with "Cannot call @triton.jit'd outside of the scope of a kernel"),
    so it is set here, when the package is imported. An explicit TRITON_INTERPRET wins."""
    if "TRITON_INTERPRET" in _os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"


_use_triton_interpreter_without_gpu()
