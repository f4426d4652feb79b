"""Packaging is declared in pyproject.toml. The one exception lives here: the repository's configs/ folder ships as
the package ``detkit.configs`` (package-dir in pyproject.toml), and pyproject's package discovery only finds
packages under detkit/, so this adds it to the discovered list (found as pyproject's discovery finds them,
folders without ``__init__.py`` included)."""

from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["detkit*"]), "detkit.configs"])
