"""Builds the CMake extension ``vqtok._C`` (pybind11 cmake_example pattern).

Environment knobs: VQTOK_CUDA=ON|OFF|AUTO (default AUTO: on when nvcc is found),
VQTOK_CUDA_ARCHS (default "80;90"), VQTOK_BUILD_TYPE (default Release), CMAKE_ARGS (extra).
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = os.environ.get("VQTOK_BUILD_TYPE", "Release")
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DVQTOK_CUDA={os.environ.get('VQTOK_CUDA', 'AUTO')}",
            f"-DVQTOK_CUDA_ARCHS={os.environ.get('VQTOK_CUDA_ARCHS', '80;90')}",
        ]
        cmake_args += [a for a in os.environ.get("CMAKE_ARGS", "").split(" ") if a]
        try:
            import ninja  # noqa: F401

            cmake_args += ["-GNinja"]
        except ImportError:
            pass
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


setup(
    package_dir={"": "tokenizers"},
    packages=find_packages(where="tokenizers"),
    ext_modules=[CMakeExtension("vqtok._C", sourcedir=str(ROOT))],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
