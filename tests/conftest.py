import jax
import pytest


@pytest.fixture(scope="module")
def fast_compilation():
    """For test modules of small problems, where XLA's optimisation passes cost more compile time
    than they save at run time. Use with `pytestmark = pytest.mark.usefixtures("fast_compilation")`;
    the previous setting is restored for the next module."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
