"""Use the model that examples/warm_bert.py built in the server (see that file).

    py-preload bundle torch transformers --warmup examples/warm_bert.py -o python-warm.bin
    ./python-warm.bin examples/use_warm.py "some text"    # the model is already there

Without py-preload (plain `python examples/use_warm.py`, or a cold run), it runs
warm_bert.py itself: same result, slower.
"""

import os
import runpy
import sys
import time
import types

start = time.perf_counter()
try:
    from preloaded import warm  # the warm-up's globals, inherited from the server
    source = "warm-up"
except ImportError:  # no server, or a bundle without this warm-up: build it here
    here = os.path.dirname(os.path.abspath(__file__))
    warm = types.SimpleNamespace(**runpy.run_path(os.path.join(here, "warm_bert.py")))
    source = "built here"

import torch  # noqa: E402

# The idiom: built on the CPU in warm-up, moved to the GPU (if any) in the child.
device = "cuda" if torch.cuda.is_available() else "cpu"
model = warm.model.to(device)
ids = warm.encode(" ".join(sys.argv[1:]) or "py-preload keeps models warm").to(device)
with torch.no_grad():
    embedding = model(input_ids=ids).last_hidden_state.mean(dim=1)
elapsed = time.perf_counter() - start
print(f"model from {source}, on {device}: {ids.shape[1]} tokens -> {tuple(embedding.shape)}"
      f" in {elapsed * 1000:.0f} ms")
