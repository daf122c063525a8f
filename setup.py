"""Build switchkd: the Python package, the Triton kernels as `switchkd.kernels`, and the C++ extension.

`switchkd._C` (csrc/*.cpp, the KV block manager) is plain C++17 on pybind11: it handles integers only
and does not link against torch, so `pip install .` builds it in an isolated environment (pybind11 and
setuptools come from [build-system] in pyproject.toml) and it works with whatever torch is installed.
Offline, install pybind11 first and use `pip install --no-build-isolation .`.
"""

import glob

from setuptools import setup
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError

try:
    from pybind11.setup_helpers import Pybind11Extension
    from pybind11.setup_helpers import build_ext as _build_ext
except ImportError as err:
    raise SystemExit("switchkd builds its C++ extension with pybind11: `pip install .` fetches it (build "
                     "isolation); with --no-build-isolation, `pip install pybind11` first") from err


class build_ext(_build_ext):
    """pybind11's build_ext with one clear message when no C++ compiler works."""

    def build_extensions(self):
        try:
            super().build_extensions()
        except (CCompilerError, CompileError, ExecError, PlatformError) as err:
            raise SystemExit(
                f"switchkd: building the C++ extension switchkd._C failed ({err}).\n"
                "It needs a C++17 compiler: install g++ (Debian/Ubuntu: `apt-get install build-essential`) "
                "or clang++, then run `pip install .` again."
            ) from err


ext_modules = [Pybind11Extension("switchkd._C", sorted(glob.glob("csrc/*.cpp")), cxx_std=17,
                                 extra_compile_args=["-O3"])]

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
    cmdclass={"build_ext": build_ext},
)
