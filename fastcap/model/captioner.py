"""FastCap: image encoder -> visual tokens -> Transformer decoder.

Decoding (greedy, beam search, sampling) runs with a preallocated self-attention
KV cache and cross-attention keys/values computed once per image; beams and
samples are folded into the batch dimension.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from fastcap.data.vocab import BOS_ID, EOS_ID, PAD_ID
from fastcap.model.encoder import EncoderConfig, build_encoder
from fastcap.model.transformer import DecoderBlock


@dataclass
class ModelConfig:
    name: str = "fastcap"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    d_model: int = 256
    n_layers: int = 3
    n_heads: int = 4
    mlp_mult: int = 4
    dropout: float = 0.1
    max_len: int = 20
    vocab_size: int = 0  # set from the vocabulary

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        enc = EncoderConfig(**d.pop("encoder", {}))
        known = cls.__dataclass_fields__
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(encoder=enc, **d)

    def to_dict(self) -> dict:
        return asdict(self)


class FastCap(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 5:
            raise ValueError("ModelConfig.vocab_size must be set from the vocabulary")
        self.cfg = cfg
        self.encoder = build_encoder(cfg.encoder, cfg.dropout)
        self.enc_proj = nn.Linear(self.encoder.out_dim, cfg.d_model)
        self.enc_ln = nn.LayerNorm(cfg.d_model)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Parameter(torch.randn(cfg.max_len, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(DecoderBlock(cfg.d_model, cfg.n_heads, cfg.mlp_mult, cfg.dropout)
                                    for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(self._init)
        if cfg.encoder.freeze:
            self.encoder.requires_grad_(False)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- training-time forward -------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        return self.enc_ln(self.enc_proj(self.encoder(images)))

    def decode_logits(self, memory: Tensor, tokens: Tensor, return_hidden: bool = False):
        """Teacher-forced logits [N, T, V] for input tokens [N, T] (starting with BOS)."""
        t = tokens.shape[1]
        x = self.drop(self.tok_emb(tokens) + self.pos_emb[:t])
        attn = None
        for i, blk in enumerate(self.blocks):
            if return_hidden and i == len(self.blocks) - 1:
                x, attn = blk(x, memory=memory, need_weights=True)
            else:
                x = blk(x, memory=memory)
        h = self.ln_f(x)
        logits = self.head(h)
        return (logits, h, attn) if return_hidden else logits

    def forward(self, images: Tensor, tokens: Tensor, return_hidden: bool = False):
        """images [B,3,H,W], tokens [B,K,T] (K captions per image) -> logits [B*K, T-1, V].

        Each image is encoded once and its memory shared by its K captions.
        """
        b, k, t = tokens.shape
        memory = self.encode(images).repeat_interleave(k, dim=0)
        return self.decode_logits(memory, tokens.reshape(b * k, t)[:, :-1], return_hidden)

    # --- cached decoding --------------------------------------------------------
    def init_state(self, memory: Tensor, max_len: int) -> tuple[list[dict], list]:
        n = memory.shape[0]
        d, h = self.cfg.d_model, self.cfg.n_heads
        caches = [{"k": memory.new_zeros(n, h, max_len, d // h), "v": memory.new_zeros(n, h, max_len, d // h),
                   "pos": 0} for _ in self.blocks]
        mem_kv = [blk.cross_attn.memory_kv(memory) for blk in self.blocks]
        return caches, mem_kv

    def step(self, tokens: Tensor, caches: list[dict], mem_kv: list, pos: int) -> Tensor:
        """Logits [N, V] for the next token after `tokens` [N] at position `pos`."""
        x = self.tok_emb(tokens[:, None]) + self.pos_emb[pos]
        for blk, cache, kv in zip(self.blocks, caches, mem_kv):
            cache["pos"] = pos
            x = blk(x, mem_kv=kv, cache=cache)
        return self.head(self.ln_f(x))[:, 0]

    def _max_len(self, max_len: int | None) -> int:
        return min(max_len or self.cfg.max_len, self.cfg.max_len) - 1  # BOS takes a position

    @torch.no_grad()
    def greedy(self, images: Tensor, max_len: int | None = None) -> Tensor:
        return self.sample(images, 1, max_len, greedy=True)

    @torch.no_grad()
    def sample(self, images: Tensor, n: int = 1, max_len: int | None = None, temperature: float = 1.0,
               greedy: bool = False, memory: Tensor | None = None) -> Tensor:
        """n sampled (or greedy) captions per image -> tokens [B*n, L] without BOS, PAD after EOS."""
        steps = self._max_len(max_len)
        if memory is None:
            memory = self.encode(images)
        memory = memory.repeat_interleave(n, dim=0)
        caches, mem_kv = self.init_state(memory, steps)
        N = memory.shape[0]
        out = torch.full((N, steps), PAD_ID, dtype=torch.long, device=memory.device)
        tok = torch.full((N,), BOS_ID, dtype=torch.long, device=memory.device)
        done = torch.zeros(N, dtype=torch.bool, device=memory.device)
        for t in range(steps):
            logits = self.step(tok, caches, mem_kv, t).float()
            if greedy:
                tok = logits.argmax(-1)
            else:
                tok = torch.multinomial((logits / temperature).softmax(-1), 1)[:, 0]
            tok = tok.masked_fill(done, PAD_ID)
            out[:, t] = tok
            done |= tok == EOS_ID
            if bool(done.all()):
                break
        return out

    @torch.no_grad()
    def beam_search(self, images: Tensor, beam_size: int = 3, max_len: int | None = None,
                    length_penalty: float = 0.0, memory: Tensor | None = None) -> Tensor:
        """Best beam per image -> tokens [B, L]; score = sum log p / ((5+len)/6)^length_penalty (GNMT)."""
        steps = self._max_len(max_len)
        if memory is None:
            memory = self.encode(images)
        B, K, dev = memory.shape[0], beam_size, memory.device
        memory = memory.repeat_interleave(K, dim=0)
        caches, mem_kv = self.init_state(memory, steps)
        seqs = torch.full((B * K, steps), PAD_ID, dtype=torch.long, device=dev)
        tok = torch.full((B * K,), BOS_ID, dtype=torch.long, device=dev)
        scores = torch.zeros(B, K, device=dev)
        scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
        done = torch.zeros(B * K, dtype=torch.bool, device=dev)
        base = torch.arange(B, device=dev)[:, None] * K
        for t in range(steps):
            logp = self.step(tok, caches, mem_kv, t).float().log_softmax(-1)
            V = logp.shape[-1]
            # A finished beam may only extend itself with PAD at no cost, so it keeps its score.
            logp[done] = float("-inf")
            logp[done, PAD_ID] = 0.0
            top, idx = (scores.view(-1, 1) + logp).view(B, K * V).topk(K, dim=1)
            src = (base + idx // V).view(-1)
            tok = (idx % V).view(-1)
            seqs = seqs[src]
            seqs[:, t] = tok
            for c in caches:
                c["k"], c["v"] = c["k"][src], c["v"][src]
            done = done[src] | (tok == EOS_ID)
            scores = top
            if bool(done.all()):
                break
        lengths = ((seqs != PAD_ID) & (seqs != EOS_ID)).sum(-1).float().view(B, K) + 1
        final = scores / ((5 + lengths) / 6) ** length_penalty
        best = final.argmax(-1)
        return seqs.view(B, K, steps)[torch.arange(B, device=dev), best]

    @torch.no_grad()
    def generate(self, images: Tensor, beam_size: int = 1, max_len: int | None = None,
                 length_penalty: float = 0.0) -> Tensor:
        if beam_size <= 1:
            return self.greedy(images, max_len)
        return self.beam_search(images, beam_size, max_len, length_penalty)
