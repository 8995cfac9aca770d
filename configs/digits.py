"""`--config=configs/digits.py` and `from configs import digits` in a checkout: the recipe is
dino_jax/configs/digits.py, shipped with the package (`dino-jax --config=digits` when installed)."""

from dino_jax.configs.digits import get_config  # noqa: F401
