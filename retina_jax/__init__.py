"""retina_jax: JAX/Flax retinal vision-language pretraining (FLAIR, KeepFIT, KeepFIT V2, ViLReF)."""

__version__ = "0.1.0"
