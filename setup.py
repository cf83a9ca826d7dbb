"""Build the Cython extension over libbpf and the CO-RE BPF object.

`pip install .` (and dh-virtualenv) runs both; `make build` does the same
in place for development.
"""
import os
import shutil
import subprocess

from setuptools import Command, Extension, setup
from setuptools.command.build_py import build_py

from Cython.Build import cythonize

HERE = os.path.dirname(os.path.abspath(__file__))
BPF_SRC = os.path.join("bpf", "tapio.bpf.c")
# Built objects go into the package, apart from the C sources in bpf/.
BPF_OBJ = os.path.join("tapio_node", "kernel", "obj", "tapio.bpf.o")
# The same programs without the bpf_rdonly_cast kfunc (kernels before 6.2):
# resolving even a __weak kfunc the kernel lacks makes libbpf walk module
# BTFs, which needs CAP_SYS_ADMIN, which the systemd unit does not grant.
BPF_OBJ_NO_KFUNC = os.path.join("tapio_node", "kernel", "obj", "tapio-nokfunc.bpf.o")


def compile_bpf():
    """Compile bpf/tapio.bpf.c with clang as a CO-RE object."""
    clang = os.environ.get("CLANG", "clang")
    if shutil.which(clang) is None:
        raise SystemExit(
            "error: clang is needed to compile bpf/tapio.bpf.c "
            "(Debian: apt-get install clang llvm libbpf-dev)")
    os.makedirs(os.path.dirname(BPF_OBJ), exist_ok=True)
    llvm_strip = shutil.which("llvm-strip") or shutil.which("llvm-strip-14")
    for obj, defines in ((BPF_OBJ, []), (BPF_OBJ_NO_KFUNC, ["-DTAPIO_NO_KFUNCS"])):
        cmd = [clang, "-g", "-O2", "-Wall", "-Werror", "-target", "bpf",
               "-D__TARGET_ARCH_x86", *defines, "-Ibpf", "-c", BPF_SRC, "-o", obj]
        subprocess.run(cmd, check=True, cwd=HERE)
        # Strip DWARF but keep BTF: CO-RE needs only .BTF/.BTF.ext.
        if llvm_strip:
            subprocess.run([llvm_strip, "-g", obj], check=True, cwd=HERE)


class BuildBpf(Command):
    description = "compile the CO-RE BPF objects into tapio_node/kernel/obj/"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        compile_bpf()


class BuildPyWithBpf(build_py):
    def run(self):
        compile_bpf()
        super().run()


extensions = [
    Extension(
        "tapio_node._fast",
        sources=["_fast/_fast.pyx"],
        include_dirs=["bpf", "_fast"],
        libraries=["bpf", "elf", "z"],
        extra_compile_args=["-O2", "-Wno-unused-function"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False},
    ),
    cmdclass={"build_py": BuildPyWithBpf, "build_bpf": BuildBpf},
)
