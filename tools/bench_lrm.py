r"""Benchmark: image -> triplanes with the LRM (random weights, real sizes by default).

  python -m tools.bench_lrm                       # released architecture
  python -m tools.bench_lrm --variant tiny --iters 5

Measures
  * latency at batch 1 in float32 with matmul precision "highest";
  * throughput at batch ``--batch`` (8) in bfloat16 compute (float32 parameters),
    with cuDNN flash attention on GPUs;
  * the relative error of the bfloat16 planes against float32 ones
    (``||bf16 - fp32|| / ||fp32||`` and the max abs error over max abs value).

Reference (released PyTorch model, one H200): 85 ms at batch 1 fp32,
100 images/s at batch 8 with bf16 autocast. Targets: <= 40 ms, >= 200 images/s,
bf16 planes within 1e-2 relative error.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import lrm as lrm_configs
from vf3d_jax import cli
from vf3d_jax.models import lrm
from vf3d_jax.rendering import cameras
from tools.benchmarking import median_seconds, peak_gib

_VARIANT = flags.DEFINE_string("variant", "vfusion3d", "configs/lrm.py variant.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch of the bfloat16 throughput run.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed iterations per measurement.")
_ATTENTION = flags.DEFINE_string("attention", "auto",
                                 "Attention implementation for bf16: auto, xla or cudnn.")


def main(argv):
  del argv
  arch = lrm.LRMArch.from_dict(lrm_configs.get_config(_VARIANT.value).model.to_dict())
  backend = jax.default_backend()
  impl = _ATTENTION.value
  if impl == "auto":
    impl = "cudnn" if backend == "gpu" else None
  params = lrm.init_params(arch, jax.random.key(0))  # one compiled program
  rng = np.random.default_rng(0)

  def inputs(n):
    images = rng.uniform(size=(n, arch.input_size, arch.input_size, 3)).astype(np.float32)
    cams = np.broadcast_to(cameras.DEFAULT_SOURCE_CAMERA, (n, 16)).copy()
    return jnp.asarray(images), jnp.asarray(cams)

  def forward(dtype, attention_impl):
    model = lrm.LRM(arch, dtype=dtype, attention_impl=attention_impl)
    return jax.jit(lambda p, x, c: model.apply({"params": p}, x, c))

  with jax.default_matmul_precision("highest"):
    fp32 = forward(jnp.float32, None)
    x1, c1 = inputs(1)
    latency = median_seconds(fp32, params, x1, c1, iters=_ITERS.value, warmup=2)
    xb, cb = inputs(_BATCH.value)
    planes_fp32 = fp32(params, xb, cb)

  bf16 = forward(jnp.bfloat16, impl)
  step = median_seconds(bf16, params, xb, cb, iters=_ITERS.value, warmup=2)
  planes_bf16 = bf16(params, xb, cb)
  diff = planes_bf16 - planes_fp32
  result = {
      "backend": backend,
      "device": jax.devices()[0].device_kind,
      "variant": _VARIANT.value,
      "params": lrm.count_params(params),
      "fp32_batch1_ms": round(latency * 1e3, 2),
      "bf16_batch": _BATCH.value,
      "bf16_images_per_s": round(_BATCH.value / step, 2),
      "bf16_attention": impl or "xla",
      "bf16_rel_l2_error": float(jnp.linalg.norm(diff) / jnp.linalg.norm(planes_fp32)),
      "bf16_max_error_over_max": float(jnp.abs(diff).max() / jnp.abs(planes_fp32).max()),
  }
  if peak_gib() is not None:
    result["peak_gib"] = peak_gib()
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  cli.run(main)
