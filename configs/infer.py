r"""Single-image -> 3D inference settings.

Variants:

* ``vfusion3d`` (default): the released pipeline's settings: 160-view 384x384
  turntable at 40 fps on a radius-1.5 orbit, 64 + 64 samples a ray, 512^3 mesh
  grid at density 1.0, float32 (matmuls at "highest" precision), renderer in
  "compatible" mode. The mesh goes further than the released one's vertex-coloured
  OBJ: floaters removed, decimated to 50k faces, and a UV-textured GLB
  (``--config.mesh.texture=vertex --config.mesh.format=obj --config.mesh.min_component=0
  --config.mesh.max_faces=0`` writes the released output).
* ``fast``: the same outputs from the renderer's fast mode (samples at fixed
  depths laid only in the cells of a 128^3 occupancy grid built once per
  object; 64 reads of the grid's density lattice a ray place the 12 decoder
  samples that are composited; rays stopped where the transmittance falls
  below 1e-3; on a fitted field 8.4x faster than compatible at 42.0 dB on 2 CPU
  cores, docs/benchmarks/speed.md), with
  bfloat16 model compute, bfloat16
  planes and decoder matmuls (GPU/TPU; on a CPU bfloat16 is emulated, so there
  ``--config.model.dtype=float32 --config.render.mlp_dtype=float32
  --config.render.planes_dtype=`` is faster).
* ``demo``: small sizes for a CPU: 40 views at 128x128, 128^3 mesh grid; the
  embedded toy models of ``examples/`` (the LRM when no checkpoint is given,
  and the image and video models of text -> 3D).

Text -> 3D (``--prompt``) samples a first frame with ``text.image_model``, an
orbit video with ``text.video_model``, then reconstructs the first frame
(vf3d_jax/inference/text_to_3d.py).

  python -m vf3d_jax.infer --checkpoint model.safetensors --image photos/ --output out/
  python -m vf3d_jax.infer --config configs/infer.py:fast --config.render.num_views=80 ...
"""

import os

import ml_collections

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def get_config(arg: str = "vfusion3d") -> ml_collections.ConfigDict:
  if arg not in ("vfusion3d", "fast", "demo"):
    raise ValueError(f"unknown inference variant {arg!r}; choose vfusion3d, fast or demo")
  c = ml_collections.ConfigDict()
  c.variant = arg
  c.seed = 0  # randomness of the renderer's samples and the orbit's angle offset
  # Matmul precision: "highest" keeps float32 matmuls float32 on GPUs (no TF32) and TPUs (no
  # bfloat16 passes), as the parity with PyTorch assumes; "default" (the fast variant) lets
  # them trade accuracy for speed.
  c.precision = "default" if arg == "fast" else "highest"

  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"  # LRM compute dtype: float32 or bfloat16
  c.model.attention_impl = ""  # "" (XLA), "xla" or "cudnn"
  c.model.pos_resize = "legacy"  # DINOv2 position-table resize of checkpoint files

  c.preprocess = ml_collections.ConfigDict()
  c.preprocess.foreground_ratio = 0.8  # object's longer side over the image side
  # Background removal for opaque images: auto (rembg isnet-general-use when installed with its
  # model, else grabcut), grabcut, builtin (one border colour), none, rembg[:<model>] or a
  # registered name.
  c.preprocess.matting = "auto"
  # A built-in matte (builtin, grabcut) on a background too complex for it warns; strict refuses.
  c.preprocess.strict = False
  c.preprocess.max_side = 2048  # larger images are area-downscaled to this longer side first

  c.render = ml_collections.ConfigDict()
  c.render.enabled = True
  c.render.num_views = 160
  c.render.resolution = 384
  c.render.radius = 1.5
  c.render.elevation_deg = 0.0
  c.render.fps = 40
  c.render.format = "mp4"  # mp4 or gif
  # compatible (released quirks), clean, or fast (samples only in the occupied cells of a grid
  # built once per object, early ray termination; vf3d_jax/rendering/renderer.py)
  c.render.mode = "compatible"
  c.render.num_coarse = 64
  c.render.num_fine = 64
  c.render.chunk_size = 16384  # rays per step; bounds memory
  c.render.views_per_call = 8  # views rendered per compiled call
  c.render.mlp_dtype = "float32"
  c.render.planes_dtype = ""  # "" keeps float32 planes
  # The fast mode's occupancy grid and termination (renderer.RenderOptions).
  c.render.occupancy_resolution = 64  # cells a side
  c.render.occupancy_threshold = 0.01  # activated density that makes a cell occupied
  c.render.occupancy_dilation = 1  # cells the occupied region grows by
  c.render.termination = 1e-3  # transmittance below which a ray stops
  c.render.occupancy_subdivision = 2  # density queries a cell side for the grid
  c.render.num_probes = 0  # grid probes a ray; 0: 2 x occupancy_resolution
  # Jittered samples, as released; False places them at fixed depths (the fast variant: with
  # 16 + 16 samples the jitter costs 4 dB against compatible).
  c.render.jitter = True
  # The fast mode's coarse pass on the occupancy grid's density lattice instead of the decoder.
  c.render.proposal = False

  c.mesh = ml_collections.ConfigDict()
  c.mesh.enabled = True
  c.mesh.resolution = 512
  c.mesh.threshold = 1.0
  # Coarse-to-fine grid: the field every coarse_block grid intervals, then the full resolution
  # only in the blocks the surface can cross (the full grid's surface for ~5% of its queries at
  # 512^3; mesh.density_grid_coarse_to_fine); 0 queries every grid point.
  c.mesh.coarse_block = 8
  c.mesh.format = "glb"  # glb, obj (with .mtl and .png when textured) or ply (vertex colours)
  # uv: an xatlas atlas with the field's colour baked in (vf3d_jax/inference/texture.py);
  # vertex: per-vertex colours (the released output, with format=obj, min_component=0, max_faces=0)
  c.mesh.texture = "uv"
  c.mesh.texture_size = 1024  # texels a side
  c.mesh.min_component = 0.01  # pieces with fewer than this fraction of the faces are dropped
  c.mesh.max_faces = 50000  # quadric decimation to this many faces; 0 keeps them all
  c.mesh.chunk = 2 ** 21  # grid points per query

  t = c.text = ml_collections.ConfigDict()
  # Exported models of `python -m vf3d_jax.train_video` (stage "image", then stage "video").
  t.image_model = ""
  t.video_model = ""
  t.fps = 8  # orbit.mp4
  t.sample = ml_collections.ConfigDict()  # vf3d_jax.video.sampling.SampleOptions
  t.sample.sampler = "ddim"
  t.sample.num_steps = 25
  t.sample.eta = 0.0
  t.sample.image_scale = 2.0
  t.sample.text_scale = 5.0
  t.sample.guidance_rescale = 0.0
  t.sample.replace_first_frame = True

  if arg == "fast":
    c.render.mode = "fast"
    c.render.proposal = True  # 64 samples of the grid's density lattice place 12 decoder samples
    c.render.num_coarse = 64
    c.render.num_fine = 12  # 16: 3.6 dB closer to compatible for 15% more time
    c.render.occupancy_resolution = 128
    c.render.occupancy_subdivision = 1  # 129^3 queries, as many as 64^3 cells at 2
    c.render.num_probes = 128
    c.render.jitter = False
    c.model.dtype = "bfloat16"
    c.render.mlp_dtype = "bfloat16"
    c.render.planes_dtype = "bfloat16"
  if arg == "demo":
    c.render.num_views = 40
    c.render.resolution = 128
    c.render.fps = 20
    c.mesh.resolution = 128
    c.mesh.texture_size = 512
    c.mesh.max_faces = 20000
    t.image_model = os.path.join(EXAMPLES, "image_model")
    t.video_model = os.path.join(EXAMPLES, "video_model")
    t.sample.num_steps = 20
    t.sample.text_scale = 2.0
  return c
