"""The config a training run directory was trained with, read from its run_info.json
(retina_jax/config.py `from_run`): `--config configs/run.py:WORKDIR`. `retina-jax evaluate` uses it
when no --config is given, so `--config.x=...` overrides still apply."""


def get_config(arg=None):
    from retina_jax.config import from_run
    if not arg:
        raise ValueError("configs/run.py needs the run directory: configs/run.py:WORKDIR")
    return from_run(arg)
