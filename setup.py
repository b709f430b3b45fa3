"""setuptools: the packages under src/, plus configs/ and specs/ shipped as package data.

Everything else is in pyproject.toml. configs/ and specs/ stay at the repository root and are
installed as fairdistill/configs and fairdistill/specs (see src/fairdistill/packaged.py).
"""
from setuptools import find_packages, setup

setup(packages=[*find_packages("src"), "fairdistill.configs", "fairdistill.specs"])
