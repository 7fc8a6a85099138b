"""Learned preloads: a script whose lazy imports the server learns after two runs.

transformers loads its submodules lazily: a bundle of `torch transformers` leaves each run of
this script about a second of imports (AutoModel, AutoTokenizer, the BERT classes). Each run
reports them; from the third run on the server has imported them too:

    py-preload bundle torch transformers -o python-tt.bin
    ./python-tt.bin examples/learned.py     # run 1: starts the server; imports the rest itself
    ./python-tt.bin examples/learned.py     # run 2: the same imports (now needed twice)
    ./python-tt.bin examples/learned.py     # run 3: they are warm (as fast as hello-world)
                                            # (the server imports them in the second or so
                                            # after run 2; a run that comes sooner waits for
                                            # at most one of them)
    py-preload status python-tt.bin         # "learned:" lists them with their import cost

It runs the same with plain `python examples/learned.py`.
"""

import time

start = time.perf_counter()
from transformers import AutoModel, AutoTokenizer, BertConfig  # noqa: E402

config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=64)  # fmt: skip
model = AutoModel.from_config(config)
elapsed = time.perf_counter() - start
print(f"{type(model).__name__} with {sum(p.numel() for p in model.parameters())} parameters"
      f" ({AutoTokenizer.__name__} ready) in {elapsed * 1000:.0f} ms")
