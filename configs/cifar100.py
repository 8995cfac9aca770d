"""`--config=configs/cifar100.py` and `from configs import cifar100` in a checkout: the recipe is
dino_jax/configs/cifar100.py, shipped with the package (`dino-jax --config=cifar100` when installed)."""

from dino_jax.configs.cifar100 import get_config  # noqa: F401
