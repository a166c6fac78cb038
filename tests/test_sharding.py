"""The data x fsdp mesh and parameter sharding (retina_jax/sharding.py), bfloat16 compute and
rematerialisation: FSDP and replicated steps give the same loss, gradients and training losses; the
compiled FSDP step holds a [B/n, B] block of each logits matrix per device and a fraction of the
parameters; bf16 stays within the tolerance recorded in benchmarks/RESULTS.md; remat changes no
number."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from retina_jax import losses, sharding
from retina_jax.config import ConfigError, validate
from retina_jax.data import pipeline
from retina_jax.train import Trainer
from test_train import leaves, tiny_config
from test_vilref import tiny_vilref

# 2 x 4 mesh, every tensor of 256+ elements split over the 4 fsdp devices.
FSDP = {"mesh.data": 2, "mesh.fsdp": 4, "mesh.param_sharding": "fsdp", "mesh.fsdp_min_size": 256}


def test_fsdp_spec_splits_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((512, 128), 4, 1) == P("fsdp", None)
    assert sharding.fsdp_spec((3, 3, 64, 256), 4, 1) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((510, 128), 4, 1) == P(None, "fsdp")  # 510 % 4 != 0: the next largest
    assert sharding.fsdp_spec((128, 128), 4, 1) == P("fsdp", None)  # equal sizes: the first
    assert sharding.fsdp_spec((7, 9), 4, 1) == P()  # nothing divides: replicated
    assert sharding.fsdp_spec((512,), 4, 1024) == P()  # below the minimum size: replicated
    assert sharding.fsdp_spec((), 4, 0) == P()
    assert sharding.fsdp_spec((512, 128), 1, 1) == P()  # a 1-device fsdp axis


def test_the_mesh_follows_the_device_topology_and_never_silently_leaves_devices_out(devices, monkeypatch, caplog):
    # Review defects: the mesh came from jax.devices() in list order, and a smaller mesh dropped
    # devices without a word (on several processes, some then held no part of it).
    calls = []
    real = jax.make_mesh
    monkeypatch.setattr(jax, "make_mesh", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    mesh = sharding.make_mesh(tiny_config(**FSDP).mesh)
    assert calls and calls[0][0][:2] == ((2, 4), ("data", "fsdp")) and mesh.devices.size == 8
    with caplog.at_level("WARNING"):
        small = sharding.make_mesh(tiny_config(**{"mesh.data": 2}).mesh)
    assert small.devices.size == 2 and "uses 2 of the 8 devices; 6 stay idle" in caplog.text
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"uses 2 of the 8 devices of 2 processes; a multi-process mesh must use "
                                         r"every device"):
        sharding.make_mesh(tiny_config(**{"mesh.data": 2}).mesh)


def test_mesh_axes_from_the_config_and_bad_meshes_name_their_field(devices):
    mesh = sharding.make_mesh(tiny_config(**FSDP).mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4} and sharding.num_batch_shards(mesh) == 8
    assert dict(sharding.make_mesh(tiny_config(**{"mesh.fsdp": 2}).mesh).shape) == {"data": 4, "fsdp": 2}
    # Each fsdp group is a run of consecutive devices: one host's, when fsdp <= local devices.
    assert [d.id for d in mesh.devices[1]] == [4, 5, 6, 7]
    for change, field in [({"mesh.fsdp": 3}, "mesh.fsdp"), ({"mesh.data": 4, "mesh.fsdp": 4}, "mesh.data"),
                          ({"mesh.param_sharding": "zero3"}, "mesh.param_sharding"),
                          ({"mesh.data": 3}, "data.batch_size")]:
        with pytest.raises(ConfigError, match=f"config.{field}"):
            validate(tiny_config(**change), 8)


def _specs(tree) -> dict[str, P]:
    return {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_optimizer_state_and_momentum_params_follow_the_params_and_queues_stay_replicated(tmp_path):
    trainer = Trainer(tiny_vilref(**FSDP), str(tmp_path))
    shardings = trainer.state_sharding
    params, ema = _specs(shardings.params), _specs(shardings.ema_params)
    assert ema == params
    sharded = {k for k, spec in params.items() if "fsdp" in spec}
    sizes = {jax.tree_util.keystr(p): a.size for p, a in jax.tree_util.tree_flatten_with_path(
        trainer.abstract_state.params)[0]}
    assert all(sizes[k] >= 256 for k in sharded)  # biases, LayerNorms and the like stay whole
    assert sum(sizes[k] for k in sharded) > 0.95 * sum(sizes.values())  # but nearly every parameter is split
    # Adam's two moments of each parameter are laid out as the parameter itself.
    followed = 0
    for key, spec in _specs(shardings.opt_state).items():
        owners = [p for p in params if key.endswith(p)]
        if owners:
            assert spec == params[max(owners, key=len)], key
            followed += 1
    assert followed == 2 * len(params)
    for tree in (shardings.queues, shardings.batch_stats):
        assert set(_specs(tree).values()) <= {P()}
    assert shardings.step.spec == P() and shardings.rng.spec == P()


def logits_shapes(hlo: str, dtype: str = "f32") -> set[tuple[int, int]]:
    """The 2-D `dtype` result shapes of the compiled program's ops inside the contrastive-logits scope
    (losses.LOGITS_SCOPE): what one device holds of the logits matrices."""
    shapes = set()
    for line in hlo.splitlines():
        if losses.LOGITS_SCOPE in line and " = " in line:
            result = line.split(" = ", 1)[1]
            match = re.match(rf"{dtype}\[(\d+),(\d+)\]", result)
            if match:
                shapes.add((int(match[1]), int(match[2])))
    return shapes


def _batches(trainer, n):
    data = iter(pipeline.train_dataset(trainer.config, trainer.tokenize, None, None))
    return [next(data) for _ in range(n)]


def _global(trainer, batch):
    return pipeline.make_global(batch, trainer.batch_sharding)


@pytest.fixture(scope="module")
def replicated_run(tmp_path_factory):
    """Tiny FLAIR, replicated on 8 data devices: 4 steps on fixed batches, with the step-0 loss and
    gradients."""
    trainer = Trainer(tiny_config(), str(tmp_path_factory.mktemp("replicated")))
    batches = _batches(trainer, 4)
    return trainer, batches, _run(trainer, batches)


def _run(trainer, batches):
    state = trainer.init_state()
    grad_fn = jax.jit(trainer.loss_and_grads, out_shardings=(trainer.replicated, trainer.state_sharding.params))
    loss, grads = grad_fn(state, _global(trainer, batches[0]))
    out = {"init": leaves(state.params), "loss": float(loss), "grads": leaves(grads), "losses": []}
    for batch in batches:
        state, metrics = trainer.train_step(state, _global(trainer, batch))
        out["losses"].append(float(metrics["train/loss"]))
    out["params"] = leaves(state.params)
    return out


def test_fsdp_and_replicated_steps_give_the_same_losses_and_gradients(replicated_run, tmp_path):
    reference, batches, ref = replicated_run
    fsdp = Trainer(tiny_config(**FSDP), str(tmp_path))
    got = _run(fsdp, batches)
    for a, b in zip(got["init"], ref["init"]):  # the same initialisation whatever the layout
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6)
    scale = max(np.abs(g).max() for g in ref["grads"])  # some tensors' gradients are float32 noise (~1e-11)
    for a, b in zip(got["grads"], ref["grads"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)

    # The compiled FSDP step: a [B/8, B] = [2, 16] block of the logits per device, never [16, 16];
    # a quarter of each large parameter tensor per device.
    state = fsdp.init_state()
    compiled = fsdp.train_step.lower(state, _global(fsdp, batches[0])).compile()
    shapes = logits_shapes(compiled.as_text())  # (the scope also holds the [B, D] gathered embeddings)
    assert (2, 16) in shapes and (16, 16) not in shapes
    kernel = state.params["txt_proj"]["dense"]["kernel"]  # [128, 128]
    assert kernel.sharding.shard_shape(kernel.shape) == (32, 128)
    ref_state = reference.init_state()
    ref_bytes = reference.train_step.lower(ref_state, _global(reference, batches[0])).compile() \
        .memory_analysis().argument_size_in_bytes
    assert compiled.memory_analysis().argument_size_in_bytes < 0.4 * ref_bytes


# bf16 vs float32 over the tiny run's 4 steps: benchmarks/RESULTS.md (bf16_parity.py) records the
# same comparison on the ViLReF demo; on the tiny run the largest relative loss difference measured
# is well inside this bound.
BF16_LOSS_RTOL = 2e-2


def test_bf16_compute_keeps_float32_params_logits_and_losses_within_tolerance(replicated_run, tmp_path):
    _, batches, ref = replicated_run
    trainer = Trainer(tiny_config(**{"model.compute_dtype": "bfloat16"}), str(tmp_path))
    got = _run(trainer, batches)
    state = trainer.init_state()
    assert {a.dtype for a in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {a.dtype for a in jax.tree.leaves(state.opt_state) if a.ndim} == {jnp.dtype(jnp.float32)}
    hlo = trainer.train_step.lower(state, _global(trainer, batches[0])).compile().as_text()
    assert "bf16[" in hlo  # the towers really compute in bfloat16...
    shapes = logits_shapes(hlo)  # ...and the logits blocks are float32
    assert (2, 16) in shapes and (16, 16) not in shapes
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=BF16_LOSS_RTOL)
    assert got["losses"] != ref["losses"]  # a different computation, not float32 under another name


def test_remat_gives_identical_losses(replicated_run, tmp_path):
    _, batches, ref = replicated_run
    trainer = Trainer(tiny_config(**{"model.remat": True}), str(tmp_path))
    got = _run(trainer, batches)
    # The forward pass, dropout masks included, is the same bit for bit.
    assert got["loss"] == ref["loss"] and got["losses"][0] == ref["losses"][0]
    # The recomputed forward is fused differently in the backward pass: gradients agree to float32
    # rounding (measured: 3.6e-5 relative on single elements at most), so the parameters after an
    # update do too (~1e-7 absolute) and later losses differ in their last bits at most.
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-6)
    scale = max(np.abs(g).max() for g in ref["grads"])
    for a, b in zip(got["grads"], ref["grads"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)
    # The blocks really are rematerialised: one checkpoint per image-tower block and text layer
    # (tiny: 4 ResNet blocks, 2 BERT layers).
    jaxpr = str(jax.make_jaxpr(trainer.loss_and_grads)(trainer.init_state(), _global(trainer, batches[0])))
    assert jaxpr.count("remat") == 6


@pytest.mark.parametrize("tower", ["vit", "clip_resnet", "decoder"])
def test_remat_switch_of_the_other_towers_changes_no_number(tower):
    """The trainer test above covers the ResNet and BERT; the CLIP towers and KeepFIT V2's decoder
    carry the same switch."""
    from retina_jax.models.caption_decoder import CaptionDecoder
    from retina_jax.models.clip_resnet import ModifiedResNet
    from retina_jax.models.vit import VisionTransformer
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
    tokens, memory = jnp.asarray(rng.integers(1, 20, size=(2, 5)), jnp.int32), jnp.ones((2, 4, 16))
    results = []
    for remat in (False, True):
        if tower == "vit":
            model = VisionTransformer(patch_size=8, width=32, layers=2, heads=2, image_size=32, remat=remat)
            args, kwargs = (image,), {}
        elif tower == "clip_resnet":
            model = ModifiedResNet(layers=(1, 1, 1, 1), width=8, heads=2, output_dim=16, image_size=32, remat=remat)
            args, kwargs = (image,), {"train": True, "mutable": ["batch_stats"]}
        else:
            model = CaptionDecoder(vocab_size=20, max_len=8, width=16, layers=2, heads=2, mlp_dim=32, remat=remat)
            args, kwargs = (tokens, memory), {"deterministic": False, "rngs": {"dropout": jax.random.key(1)}}
        variables = jax.jit(model.init)(jax.random.key(0), *args)

        def loss(params):
            out = model.apply({**variables, "params": params}, *args, **kwargs)
            return jnp.sum((out[0] if isinstance(out, tuple) else out) ** 2)

        # Compiled (init too): op by op, the CLIP ResNet's case took 70 s of CI on 8 fake devices.
        results.append(jax.jit(jax.value_and_grad(loss))(variables["params"]))
        if remat:
            blocks = 4 if tower == "clip_resnet" else 2
            assert str(jax.make_jaxpr(loss)(variables["params"])).count("remat") == blocks  # one per block
    (value, grads), (value_remat, grads_remat) = results
    np.testing.assert_allclose(value_remat, value, rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
