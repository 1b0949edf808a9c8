"""The ``stack`` fixture: the operated stack (``servers.py``) for one test module, stopped whatever happened."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from servers import Stack, pg_bin, start_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    if pg_bin() is None:
        message = "the integration suite needs PostgreSQL's server binaries (apt-get install -y postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("stack")
    st = start_stack(root)
    try:
        yield st
    finally:
        st.stop()
        shutil.rmtree(st.ray_temp, ignore_errors=True)
        shutil.rmtree(st.pg_home, ignore_errors=True)
