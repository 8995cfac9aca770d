import os

import jax
import pytest

from dino_jax import host_memory
from tests.optional_torch import torch

# As the CLI does, before any test starts JAX: XLA:CPU's temporaries are reused instead of faulted
# in afresh on every call (dino_jax/host_memory.py).
host_memory.keep_freed_host_memory()

# CI services set CI=true (and .ci/run does): there a parity test that would be skipped for want of
# torch fails the run instead, so a broken install cannot pass as green.
UNDER_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def fast_compilation():
    """For test modules of small problems, where XLA's optimisation passes cost more compile time
    than they save at run time. Use with `pytestmark = pytest.mark.usefixtures("fast_compilation")`;
    the previous setting is restored for the next module."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="session")
def prepared_digits_dir(tmp_path_factory):
    """A TFDS data dir shared by the tests that train on digits: the first run prepares the
    dataset in it (about 10 s), the others read it."""
    return str(tmp_path_factory.mktemp("tfds_digits"))


def pytest_runtest_setup(item):
    if torch is None and item.get_closest_marker("torch"):
        pytest.skip("needs torch, the PyTorch reference (pip install -r requirements-dev.txt)")


def _fail_a_torch_skip_under_ci(report, marked: bool) -> None:
    """Turns `report`, if a skip for want of torch (a `torch` marker, or an importorskip of it in
    the test or its module), into a failure under CI."""
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if UNDER_CI and report.skipped and (marked or "torch" in reason):
        report.outcome = "failed"
        report.longrepr = f"CI=true: a parity test was skipped ({reason}); install torch so it runs"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_a_torch_skip_under_ci(outcome.get_result(), item.get_closest_marker("torch") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_a_torch_skip_under_ci(outcome.get_result(), marked=False)
