"""PathLDM: text-conditioned latent diffusion for histopathology."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.1,<3",
    "torchvision>=0.16,<1",
    "pytorch-lightning>=2.1,<3",
    "omegaconf>=2.3,<3",
    "transformers>=4.40,<6",
    "huggingface_hub>=0.20",
    "open_clip_torch>=2.20,<4",
    "openslide-python>=1.3,<2",  # core: the quick-start demo tiles a slide
    "openslide-bin>=4.0,<5",
    "h5py>=3.8,<4",
    "einops>=0.6,<1",
    "tqdm>=4.60,<5",
    "pillow>=9.0",
    "numpy>=1.24,<3",
    "scipy>=1.10,<2",
    "scikit-image>=0.21,<1",
    "safetensors>=0.4,<1",
    "tensorboard>=2.12,<3",
    "pyyaml>=6.0,<7",
]

DATA = ["openai>=1.0,<4"]  # report summaries through an OpenAI-compatible API
# FID/KID Inception; the evaluation report's plots
EVAL = ["pytorch-fid>=0.3,<0.4", "matplotlib>=3.7,<4"]
# the local web app for pathologists (pathldm-app)
APP = ["fastapi>=0.110", "uvicorn>=0.29", "jinja2>=3.1", "python-multipart>=0.0.9"]
# pyramidal BigTIFF output of pathldm-sample-large (OpenSlide reads it: openslide is core)
LARGE = ["tifffile>=2023.1.1"]
# scripts/export.py: a diffusers folder for the Hugging Face hub (safetensors is a core dependency)
EXPORT = ["diffusers>=0.30", "safetensors>=0.4,<1"]
# the app's tests drive the system Chromium through Selenium; prdc: the reference
# precision/recall/density/coverage the evaluation metrics are tested against
TEST = ["pytest>=7.4", "ruff>=0.4", "selenium>=4.20", "prdc>=0.2,<1", *DATA, *EVAL, *APP, *LARGE,
        *EXPORT]
EXTRAS = {"data": DATA, "eval": EVAL, "app": APP, "large": LARGE, "export": EXPORT, "test": TEST,
          "dev": TEST}

# `python scripts/<name>.py` and `python -m data_prep.<name>` keep working; these are the same
# commands once installed.
CONSOLE_SCRIPTS = [
    "pathldm-train = main:main",
    "pathldm-sample = scripts.console:sample",
    "pathldm-sample-large = scripts.console:sample_large",
    "pathldm-fid = scripts.console:fid",
    "pathldm-evaluate = scripts.console:evaluate",
    "pathldm-cas = scripts.console:cas",
    "pathldm-eval-vae = scripts.console:eval_vae",
    "pathldm-ckpt = scripts.console:ckpt_tools",
    "pathldm-export = scripts.console:export",
    "pathldm-cache-latents = scripts.cache_latents:main",
    "pathldm-demo = scripts.demo:main",
    "pathldm-tile-wsi = data_prep.tile_wsi:main",
    "pathldm-tumor-til = data_prep.tumor_til:main",
    "pathldm-summarize-reports = data_prep.summarize_reports:main",
    "pathldm-build-dataset = data_prep.build_dataset:main",
    "pathldm-prepare-demo = data_prep.demo:main",
    "pathldm-app = pathldm_app.cli:main",
]

setup(
    name="pathldm",
    version="0.1.0",
    description="Text-conditioned latent diffusion for histopathology (PathLDM)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["ldm", "ldm.*", "data_prep", "data_prep.*", "scripts",
                                    "pathldm_app", "pathldm_app.*"]),
    # Top-level `main` and `scripts` are installed as they are: CompVis-style configs name
    # `main.ImageLogger`, and the commands run the same files as `python scripts/<name>.py`.
    py_modules=["main"],
    package_data={"data_prep": ["prompts/*.txt"],
                  "pathldm_app": ["templates/*.html", "static/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
