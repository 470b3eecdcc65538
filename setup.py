"""Build of the optional C extension; everything else is in pyproject.toml.

keizoku._bpe makes `keizoku tokenize` faster for Llama-3-style tokenizers. It is optional: where no C
compiler is available the package installs without it and tokenizes through tiktoken instead.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("keizoku._bpe", ["src/keizoku/_bpe.c"], optional=True,
                             extra_compile_args=["-O3", "-std=c11"])])
