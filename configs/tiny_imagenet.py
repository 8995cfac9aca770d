"""`--config=configs/tiny_imagenet.py` and `from configs import tiny_imagenet` in a checkout: the recipe is
dino_jax/configs/tiny_imagenet.py, shipped with the package (`dino-jax --config=tiny_imagenet` when installed)."""

from dino_jax.configs.tiny_imagenet import get_config  # noqa: F401
