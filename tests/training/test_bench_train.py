"""The training benchmark's synthetic batches have the trainer's format."""

import numpy as np

from tools import bench_train
from vf3d_jax.rendering import cameras
from vf3d_jax.training import lrm_data


def test_synthetic_batch_matches_the_trainer_batch():
  batch = bench_train.synthetic_batch(3, 4, input_size=64, resolution=48, crop=16, seed=1)
  assert set(batch) == set(lrm_data.BATCH_KEYS)
  assert batch["source_image"].shape == (3, 64, 64, 3)
  assert batch["render_rgb"].shape == (3, 4, 16, 16, 3)
  assert batch["render_mask"].shape == (3, 4, 16, 16)
  assert batch["render_c2w"].shape == (3, 4, 4, 4)
  crops = batch["crop"]
  assert crops.shape == (3, 4, 3) and (crops[..., 2] == 16).all()
  assert (crops[..., :2] >= 0).all() and (crops[..., :2] + 16 <= 48).all()
  # The source camera is the first supervision view's, in the model's 16-number form.
  np.testing.assert_allclose(
      batch["source_camera"],
      cameras.camera_conditioning(batch["render_c2w"][:, 0], batch["render_intrinsics"][:, 0],
                                  xp=np), rtol=0, atol=0)
  # Cameras look at the origin from outside the [-1, 1]^3 box.
  assert (np.linalg.norm(batch["render_c2w"][..., :3, 3], axis=-1) > np.sqrt(3)).all()


def test_flops_and_peak_lookup():
  assert bench_train._flops({"flops": 2.0}) == 2.0
  assert bench_train._flops([{"flops": 3.0}]) == 3.0
  assert bench_train._flops({}) is None
  assert bench_train._peak_tflops("NVIDIA H200") == 989.4
  assert bench_train._peak_tflops("TPU v5 lite") == 197.0
  assert bench_train._peak_tflops("some CPU") is None
