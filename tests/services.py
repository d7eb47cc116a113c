"""Server binaries from Debian packages that some tests start.

`scripts/setup --test` installs them. A test that needs a missing one fails,
so CI never passes by skipping it; DRPO_TEST_SKIP_MISSING_SERVICES=1 turns the
failure into a skip on a machine where the packages cannot be installed.
"""

from __future__ import annotations

import os
import shutil

import pytest

SKIP_VARIABLE = "DRPO_TEST_SKIP_MISSING_SERVICES"


def require_binary(name: str, package: str) -> str:
    """Return the path of `name`, or fail (skip when allowed) without it."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = (
        f"{name} is not installed: run scripts/setup --test or install the "
        f"Debian package {package} (apt-get install {package})."
    )
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(message)
    pytest.fail(f"{message} Set {SKIP_VARIABLE}=1 to skip the tests that need it.")
