"""Warm-up for examples/use_warm.py: build a tiny BERT once, in the server, on the CPU.

    py-preload bundle torch transformers --warmup examples/warm_bert.py -o python-warm.bin
    ./python-warm.bin examples/use_warm.py "some text"

The server runs this file after its imports; every run gets its globals as `preloaded.warm`
(`preloaded.warm.model`, `preloaded.warm.config`), shared copy-on-write. Never touch CUDA here
(the server refuses to start and names the line): build on the CPU in warm-up, move to the GPU
in the child. Plain `python examples/use_warm.py` runs this file itself.
"""

import torch
from transformers import BertConfig, BertModel

config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=128)  # fmt: skip
torch.manual_seed(0)
model = BertModel(config).eval()  # on the CPU: the child moves it where it wants it


def encode(text: str) -> torch.Tensor:
    """A toy tokenizer (no download): one id per word."""
    return torch.tensor([[sum(word.encode()) % config.vocab_size for word in text.split()]])
