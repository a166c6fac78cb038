"""Test set-up: 8 fake CPU devices (must be set before jax is imported anywhere)."""
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
# Many tests build a Trainer for the same tiny configs (a run, then its crashed and resumed twin):
# a persistent compilation cache for the session compiles each identical program once.
_cache = os.environ.get("RETINA_JAX_TEST_COMPILE_CACHE") or tempfile.mkdtemp(prefix="retina_jax_xla_cache_")
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402

# orbax splits every replicated array across its replicas to save them in parallel, compiling a
# slice program per array on each save (~25 s a checkpoint on 8 fake CPU devices). The tests' one
# host gains nothing from it; production keeps orbax's default.
ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                                        override=True)


@pytest.fixture(scope="session")
def devices():
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS)"
    return jax.devices()
