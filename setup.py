"""Only the extension list lives here; metadata is in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

MODULES = ["_loop", "_access", "_pipe", "_http", "_conn", "_relay", "_proxy", "_zone"]

extensions = [
    Extension(f"expserver.{name}", [f"ext/expserver/{name}.pyx"], extra_compile_args=["-O2"])
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    )
)
