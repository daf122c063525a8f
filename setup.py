"""Build switchkd: the Python package, the Triton kernels as `switchkd.kernels`, and the C++ extension.

C++ sources in csrc/*.cpp build `switchkd._C` with CppExtension; CUDA sources (csrc/*.cu) are added
as a CUDAExtension only where a CUDA toolkit and a CUDA build of torch are present and
SWITCHKD_SKIP_CUDA is not set. Build with `pip install --no-build-isolation .` so the extension
compiles against the torch that is installed.
"""

import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
cpp_sources = sorted(glob.glob("csrc/*.cpp"))
if cpp_sources:
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:
        raise SystemExit("switchkd builds a torch extension: install torch first, then "
                         "`pip install --no-build-isolation .`") from err
    cu_sources = sorted(glob.glob("csrc/*.cu"))
    use_cuda = bool(cu_sources) and torch.version.cuda and CUDA_HOME and not os.environ.get("SWITCHKD_SKIP_CUDA")
    extension = CUDAExtension if use_cuda else CppExtension
    sources = cpp_sources + (cu_sources if use_cuda else [])
    flags = {"cxx": ["-O3", "-std=c++17"]} | ({"nvcc": ["-O3"]} if use_cuda else {})
    ext_modules = [extension("switchkd._C", sources, extra_compile_args=flags)]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="switchkd",
    version="0.1.0",
    description="SWITCH knowledge distillation for Hugging Face LMs with fused Triton kernels",
    python_requires=">=3.10",
    packages=["switchkd", "switchkd.ops", "switchkd.decoding", "switchkd.training", "switchkd.kernels"],
    package_dir={"switchkd": "switchkd", "switchkd.kernels": "kernels"},
    install_requires=["torch>=2.11", "triton>=3.6", "transformers>=5.17", "accelerate>=1.1", "numpy", "tqdm",
                      "rouge-score"],
    extras_require={"test": ["pytest", "hypothesis", "ruff"], "flash": ["flash-attn"]},
    entry_points={"console_scripts": ["switchkd = switchkd.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
