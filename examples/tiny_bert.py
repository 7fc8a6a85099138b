"""A torch + transformers script: build a tiny BERT from a config (no download) and embed a line.

Runs the same with `python examples/tiny_bert.py` and with a starter that preloads torch and
transformers; with the starter, the imports below are already done.
"""

import sys
import time

start = time.perf_counter()
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModel, BertConfig  # noqa: E402, F401

config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=128)  # fmt: skip
torch.manual_seed(0)
model = transformers.BertModel(config).eval()
text = " ".join(sys.argv[1:]) or "py-preload keeps heavy imports warm"
ids = torch.tensor([[sum(word.encode()) % config.vocab_size for word in text.split()]])
with torch.no_grad():
    embedding = model(input_ids=ids).last_hidden_state.mean(dim=1)
elapsed = time.perf_counter() - start
print(f"torch {torch.__version__}, transformers {transformers.__version__}")
print(f"embedded {ids.shape[1]} tokens into {tuple(embedding.shape)} in {elapsed * 1000:.0f} ms")
