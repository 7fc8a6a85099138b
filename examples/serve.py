"""A small HTTP inference server: a tiny BERT (built from a config, no download) behind http.server.

    GET  /health                       -> 200 {"status": "ok"}
    POST /embed  {"texts": ["...", ...]} -> 200 {"embeddings": [[...], ...], "dim": 64}

Runs the same with `python examples/serve.py --port 8000` and with a starter that preloads
torch and transformers (then it answers in milliseconds instead of seconds):

    py-preload bench python-tt.bin --readiness http://127.0.0.1:8000/health -- examples/serve.py

Words become token ids by a stable hash (no tokenizer files needed).
"""

from __future__ import annotations

import argparse
import json
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import transformers

MAX_TEXTS = 64
MAX_BODY = 1 << 20


def build_model() -> transformers.BertModel:
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128)  # fmt: skip
    torch.manual_seed(0)  # the same weights in every process: answers comparable across runs
    return transformers.BertModel(config).eval()


def token_ids(text: str, vocab_size: int) -> list:
    """Word ids by CRC32 (stable across processes, unlike hash()); [CLS]-like 1 if empty."""
    return [zlib.crc32(word.encode()) % (vocab_size - 2) + 2 for word in text.split()] or [1]


def embed(model: transformers.BertModel, texts: list) -> list:
    """Mean-pooled last hidden states, one vector per text (a padded batch with a mask)."""
    rows = [token_ids(t, model.config.vocab_size) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return pooled.tolist()


class Handler(BaseHTTPRequestHandler):
    model: transformers.BertModel  # set in main()

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, {"status": "ok"})
        else:
            self._reply(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/embed":
            self._reply(404, {"error": f"no route {self.path}"})
            return
        try:
            texts = self._read_texts()
        except ValueError as exc:
            self._reply(400, {"error": str(exc)})
            return
        vectors = embed(self.model, texts)
        self._reply(200, {"embeddings": vectors, "dim": len(vectors[0])})

    def _read_texts(self) -> list:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            raise ValueError(f"a JSON body of 1 to {MAX_BODY} bytes is needed")
        try:
            texts = json.loads(self.rfile.read(length)).get("texts")
        except (ValueError, AttributeError):
            raise ValueError('the body must be a JSON object {"texts": [...]}') from None
        if not (isinstance(texts, list) and 0 < len(texts) <= MAX_TEXTS
                and all(isinstance(t, str) for t in texts)):  # fmt: skip
            raise ValueError(f'"texts" must be a list of 1 to {MAX_TEXTS} strings')
        return texts

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        pass  # quiet: a benchmark polls /health hundreds of times


def main() -> None:
    parser = argparse.ArgumentParser(description="Tiny BERT embedding server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    Handler.model = build_model()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"serving tiny BERT on http://{args.host}:{args.port} (GET /health, POST /embed)",
          flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
