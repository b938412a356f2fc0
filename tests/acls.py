"""Skip a test, with the reason, where POSIX ACLs cannot be tested."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tbot_py.destinations.acl import acl_support_problem


def skip_unless_acls_work(directory: Path) -> None:
    """Skip unless setfacl/getfacl are installed and ACLs work in ``directory``."""
    if shutil.which("setfacl") is None or shutil.which("getfacl") is None:
        pytest.skip("setfacl/getfacl are not installed (apt-get install acl)")
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        problem = acl_support_problem(fd)
    finally:
        os.close(fd)
    if problem is not None:
        pytest.skip(f"ACLs do not work in {directory}: {problem}")
