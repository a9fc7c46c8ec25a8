"""The package's version is the one its metadata carries (pyproject reads it from
``laplace_llm.__version__``; the wheel check in .ci/check_wheel.sh asserts it again in a
clean virtual environment)."""

import importlib.metadata
import re

import laplace_llm


def test_version_matches_the_package_metadata():
    assert re.fullmatch(r"\d+\.\d+\.\d+(\S*)", laplace_llm.__version__)
    assert laplace_llm.__version__ == importlib.metadata.version("laplace-llm")
