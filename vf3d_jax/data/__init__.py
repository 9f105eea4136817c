"""Multi-view data: procedural assets, orbit renders, records and the loader.

* ``procedural``: seeded compositions of primitives with captions.
* ``raytrace`` / ``rasterize``: exact JAX renderers of primitives and meshes.
* ``meshes``: mesh files (via trimesh) as renderable arrays.
* ``orbits``: orbit and random cameras.
* ``records``: the ``tf.train.Example`` layout of one asset's views.
* ``writer``: crash-safe, resumable shard writer; TFDS metadata.
* ``views`` / ``pipeline``: the Grain training loader.
* ``render_orbits``: the library behind ``python -m tools.render_orbits``.
"""
