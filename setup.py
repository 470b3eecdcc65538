"""Build of the optional C extensions; everything else is in pyproject.toml.

keizoku._bpe makes `keizoku tokenize` faster for Llama-3-style tokenizers, keizoku._unigram for Unigram ones
(llm-jp-3). They are optional: where no C compiler is available the package installs without them and
tokenizes through tiktoken / Hugging Face tokenizers instead.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("keizoku._bpe", ["src/keizoku/_bpe.c"], optional=True,
                             extra_compile_args=["-O3", "-std=c11"]),
                   Extension("keizoku._unigram", ["src/keizoku/_unigram.c"], optional=True,
                             extra_compile_args=["-O3", "-std=c11"])])
