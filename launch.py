"""`python launch.py FLAGS` in a checkout is `dino-jax FLAGS` once installed (dino_jax/cli.py)."""

from dino_jax import cli

if __name__ == "__main__":
    cli.run()
