import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from cluster import Cluster  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    c = Cluster()
    yield c
    c.close()
