"""What every VM test shares: the vmcores its panicking guests leave are removed after it."""

import pytest

from kvmlab import cache
from kvmlab.vm import vmcore


@pytest.fixture(autouse=True)
def vmcores_removed():
    """A panic test's run keeps a vmcore of ~0.45 GB on disk in the user's cache, where
    ``kvmlab gc`` keeps the newest 20 runs. The test has read it by the time it ends; the run's
    small files stay for a look at what happened."""
    runs = cache.area("runs")
    before = {entry.name for entry in runs.iterdir()}
    yield
    for entry in runs.iterdir():
        if entry.name not in before:
            (entry / vmcore.FILE).unlink(missing_ok=True)
