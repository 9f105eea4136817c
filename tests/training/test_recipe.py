"""Pieces of the training recipe: stages, camera noise, optimizer groups, sharding."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import lrm as lrm_configs
from vf3d_jax.models import lrm
from vf3d_jax.rendering import cameras
from vf3d_jax.training import camera_noise, lrm_data, lrm_trainer, optim, sharding


def test_stages_are_consecutive_and_the_last_runs_to_the_end():
  stages = lrm_trainer.parse_stages(((10, 128, 128, 64, 64), (5, 256, 128, 64, 64),
                                     (5, 384, 128, 48, 48)), total_steps=30)
  assert [(s.start, s.end) for s in stages] == [(0, 10), (10, 15), (15, 30)]
  assert lrm_trainer.stage_at(stages, 9).render_resolution == 128
  assert lrm_trainer.stage_at(stages, 10).render_resolution == 256
  assert lrm_trainer.stage_at(stages, 29).num_coarse == 48
  with pytest.raises(ValueError, match="crop_size 256 > render_resolution 128"):
    lrm_trainer.parse_stages(((10, 128, 256, 64, 64),), 10)
  with pytest.raises(ValueError, match=r"train.stages\[0\] must be"):
    lrm_trainer.parse_stages(((10, 128),), 10)


def test_camera_noise_statistics():
  n = 4000
  camera = jnp.broadcast_to(jnp.asarray(cameras.DEFAULT_SOURCE_CAMERA), (n, 16))
  noisy = camera_noise.perturb_cameras(jax.random.key(0), camera, rotation_deg=3.0,
                                       translation=0.0, focal=0.05)
  c2w, intr = cameras.split_conditioning(noisy)
  rot = np.asarray(c2w[:, :3, :3])
  # Still rotations.
  np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape),
                             atol=1e-5)
  # Rotation angle from the nominal pose: |N(0, s^2 I_3)| has mean s * 2 sqrt(2/pi).
  base = np.asarray(cameras.split_conditioning(camera[:1])[0][0, :3, :3])
  rel = rot @ base.T
  angles = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
  np.testing.assert_allclose(angles.mean(), 3.0 * 2 * np.sqrt(2 / np.pi), rtol=0.05)
  # The camera keeps looking at the origin when only rotated about it.
  pos = np.asarray(c2w[:, :3, 3])
  forward = -np.asarray(c2w[:, :3, 2])
  np.testing.assert_allclose(np.einsum("ni,ni->n", forward, -pos / np.linalg.norm(pos, axis=1,
                                                                                    keepdims=True)),
                             1.0, atol=1e-5)
  # Focal: relative std 0.05, principal point untouched.
  focal = np.asarray(intr[:, 0]) / 0.75
  np.testing.assert_allclose(focal.std(), 0.05, rtol=0.1)
  np.testing.assert_allclose(np.asarray(intr[:, 2:]), 0.5)
  # Translation noise alone.
  moved = camera_noise.perturb_cameras(jax.random.key(1), camera, 0.0, 0.1, 0.0)
  delta = np.asarray(cameras.split_conditioning(moved)[0][:, :3, 3]) - np.array([1.0, 0, 0])
  np.testing.assert_allclose(delta.std(axis=0), 0.1, rtol=0.1)
  # Zero scales: unchanged.
  same = camera_noise.perturb_cameras(jax.random.key(2), camera, 0.0, 0.0, 0.0)
  np.testing.assert_allclose(np.asarray(same), np.asarray(camera), atol=1e-6)


def _optim_config(**kw):
  c = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=2, steps=10, final_lr_fraction=0.1,
                                     b1=0.9, b2=0.95, weight_decay=0.5, grad_clip=1.0, frozen=""))
  c.update(kw)
  return c


def test_frozen_parameters_do_not_move_and_decay_skips_vectors():
  params = {"encoder": {"w": jnp.ones((3, 3)), "b": jnp.ones(3)},
            "head": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}}
  tx, schedule = optim.make_optimizer(_optim_config(frozen="^encoder/"), params)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  for _ in range(3):
    updates, state = tx.update(zero, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["encoder"]["w"], 1.0)
  np.testing.assert_array_equal(params["encoder"]["b"], 1.0)
  assert float(params["head"]["w"][0, 0]) < 1.0  # decayed with zero gradients
  np.testing.assert_array_equal(params["head"]["b"], 1.0)  # biases are not decayed
  assert float(schedule(0)) == 0.0 and float(schedule(2)) == pytest.approx(1e-2)
  assert float(schedule(10)) == pytest.approx(1e-3)
  with pytest.raises(ValueError, match="freeze every parameter"):
    optim.make_optimizer(_optim_config(frozen="."), params)


def test_trainable_regex_trains_only_matching_parameters():
  params = {"unet": {"conv": {"kernel": jnp.ones((3, 3))},
                     "motion_modules_0": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}}
  config = _optim_config(trainable="motion_modules", weight_decay=0.0)
  tx, _ = optim.make_optimizer(config, params)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["unet"]["conv"]["kernel"], 1.0)
  assert float(params["unet"]["motion_modules_0"]["kernel"][0, 0]) < 1.0
  assert float(params["unet"]["motion_modules_0"]["bias"][0]) < 1.0
  assert optim.is_trained(config, "unet/motion_modules_0/kernel")
  assert not optim.is_trained(config, "unet/conv/kernel")
  # frozen still wins inside the trainable set.
  assert not optim.is_trained(_optim_config(trainable="unet", frozen="bias"), "unet/b/bias")
  with pytest.raises(ValueError, match="freeze every parameter"):
    optim.make_optimizer(_optim_config(trainable="no_such_parameter"), params)


def test_parameter_ema_follows_the_trained_parameters_with_a_warmup():
  params = {"encoder": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.full((2, 2), 2.0)}}
  config = _optim_config(frozen="^encoder/", weight_decay=0.0, ema_decay=0.5)
  tx, _ = optim.make_optimizer(config, params)
  state = tx.init(params)
  ema = jax.tree.map(np.asarray, params)
  grads = {"encoder": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.arange(4.0).reshape(2, 2)}}
  for n in range(4):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    rate = min(0.5, (1 + n) / (10 + n))
    ema = jax.tree.map(lambda e, p: rate * e + (1 - rate) * np.asarray(p), ema, params)
  got = optim.ema_params(state)
  for path in (("encoder", "w"), ("head", "w")):
    np.testing.assert_allclose(got[path[0]][path[1]], ema[path[0]][path[1]], rtol=1e-6)
  np.testing.assert_array_equal(got["encoder"]["w"], 1.0)  # frozen: the average is the value
  assert not np.allclose(got["head"]["w"], params["head"]["w"])  # it lags the trained ones
  assert optim.ema_params(optim.make_optimizer(_optim_config(), params)[0].init(params)) is None
  with pytest.raises(ValueError, match="ema_decay must be in"):
    optim.make_optimizer(_optim_config(ema_decay=1.0), params)


def test_fsdp_shards_large_tensors_along_a_divisible_axis():
  mesh = sharding.make_mesh()
  assert mesh.shape[sharding.DATA_AXIS] == 4
  shapes = lrm.param_shapes(lrm.LRMArch())
  specs = sharding.tree_shardings(mesh, shapes, fsdp=True)
  qkv = specs["transformer"]["layers_0"]["self_attn"]["in_proj"]["kernel"].spec
  assert qkv == jax.sharding.PartitionSpec(None, "data")  # [1024, 3072]: the larger axis
  assert specs["transformer"]["norm"]["scale"].spec == jax.sharding.PartitionSpec()
  # Per-device parameter memory falls ~4x.
  total = sum(x.size for x in jax.tree.leaves(shapes))
  local = sum(x.size / (4 if any(s.spec) else 1)
              for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs)))
  assert local < 0.27 * total
  replicated = sharding.tree_shardings(mesh, shapes, fsdp=False)
  assert all(not any(s.spec) for s in jax.tree.leaves(replicated))


def test_dataset_mix_spec():
  assert lrm_data.parse_datasets("a/b:0.7, c:0.3") == [
      {"path": "a/b", "weight": 0.7, "fraction": 1.0}, {"path": "c", "weight": 0.3, "fraction": 1.0}]
  assert lrm_data.parse_datasets("data/x") == [{"path": "data/x", "weight": 1.0, "fraction": 1.0}]
  assert lrm_data.parse_datasets("runs/e@0.25:2,d/x@y") == [
      {"path": "runs/e", "weight": 2.0, "fraction": 0.25},
      {"path": "d/x@y", "weight": 1.0, "fraction": 1.0}]
  assert lrm_data.parse_datasets("runs/e@0.5") == [{"path": "runs/e", "weight": 1.0, "fraction": 0.5}]
  with pytest.raises(ValueError, match="data fraction must be in"):
    lrm_data.parse_datasets("runs/e@1.5")
  with pytest.raises(ValueError, match="data.train is empty"):
    lrm_data.parse_datasets("")


@pytest.mark.parametrize("variant", sorted(lrm_configs.VARIANTS))
def test_lrm_config_variants_build_with_pinned_sizes(variant):
  counts = {"vfusion3d": 452_135_700, "small": 69_158_508, "tiny": 258_932,
            "toy": 1_817_092}  # 8^2 triplane tokens (pos_embed 3 * 64 * 128)
  config = lrm_configs.get_config(variant)
  arch = lrm.LRMArch.from_dict(config.model.to_dict())
  assert lrm.count_params(lrm.param_shapes(arch)) == counts[variant]
  stages = lrm_trainer.parse_stages(config.train.stages, config.train.steps)
  assert stages[-1].end == config.train.steps
  # Remat changes nothing about the parameters.
  with_remat = jax.eval_shape(lambda: lrm.LRM(arch, remat=True).init(
      jax.random.key(0), jnp.zeros((1, arch.input_size, arch.input_size, 3)), jnp.zeros((1, 16))))
  assert lrm.count_params(with_remat) == counts[variant]


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="unknown LRM variant 'huge'"):
    lrm_configs.get_config("huge")
