"""torch and the PyTorch reference (tests/torch_reference.py), or None for both where torch is not
installed: test modules import them from here, so their torch-free tests run either way, and mark
the tests that need them `@pytest.mark.torch` (conftest.py skips those without torch, except under
CI=true, where a skipped parity test fails the run)."""

try:
    import torch

    from tests import torch_reference as ref
except ImportError:
    torch = ref = None

__all__ = ["ref", "torch"]
