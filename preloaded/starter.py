"""What starters written before py-preload 0.2 import (``from preloaded.starter import main``);
new starters import ``preloaded.client.starter``. Kept so that old starters keep working."""

from preloaded.client.starter import main  # noqa: F401
