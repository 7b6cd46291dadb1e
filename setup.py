"""Build script. The native extension rebel_kernels._C (csrc/) will be built here with
torch.utils.cpp_extension once it exists; until then the distribution is pure Python."""
from setuptools import setup

setup()
