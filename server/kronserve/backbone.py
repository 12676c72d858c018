"""The frozen T5 every task shares: loading, freezing, fingerprinting, and offline stand-ins.

A user's checkpoint (hub id or local directory) and the random stand-ins that `write_tiny_backbone`
saves go through the same `load_backbone`, so tests exercise the real loading path.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase, T5Config
from transformers import T5ForConditionalGeneration as T5

from .errors import BackboneMismatch, KronserveError
from .hub import hub_unreachable, locate
from .methods.base import Geometry

log = logging.getLogger(__name__)
DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["float32", "bfloat16", "float16"]
Shape = Literal["tiny", "t5-small", "t5-base"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Architecture of the public T5 v1 checkpoints; "tiny" is a test-sized model of the same kind.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=2, num_decoder_layers=2, vocab_size=384),
    "t5-small": dict(
        d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6, num_decoder_layers=6, vocab_size=32128
    ),
    "t5-base": dict(
        d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12, vocab_size=32128
    ),
}

# Config keys that decide whether an adapter's numbers still mean the same thing.
_ARCH_KEYS = (
    "model_type",
    "d_model",
    "d_kv",
    "d_ff",
    "num_heads",
    "num_layers",
    "num_decoder_layers",
    "vocab_size",
    "feed_forward_proj",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "layer_norm_epsilon",
    "tie_word_embeddings",
)
_SAMPLE = 4096
_MAX_DIM, _MAX_LAYERS = 1 << 20, 1024  # sanity bounds on what an adapter file may claim


@dataclass(frozen=True)
class Fingerprint:
    """What an adapter is checked against: the geometry, plus a digest of config and weights.

    The digest covers a sample of the float32 weights, so two random backbones of one shape differ.
    """

    model_type: str
    d_model: int
    num_layers: int
    num_decoder_layers: int
    vocab_size: int
    d_ff: int
    d_attn: int
    digest: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.d_model, self.num_layers, self.num_decoder_layers, self.d_ff, self.d_attn)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Fingerprint:
        """Parse an adapter's claim about its backbone; types and sizes are checked, not trusted."""
        missing = [k for k in cls.__dataclass_fields__ if k not in data]
        if missing:
            raise BackboneMismatch(f"adapter metadata 'backbone' is not a fingerprint: missing {missing}")
        for k in ("model_type", "digest"):
            if not isinstance(data[k], str):
                raise BackboneMismatch(f"adapter metadata 'backbone.{k}' must be a string")
        limits = {
            "d_model": _MAX_DIM,
            "vocab_size": _MAX_DIM,
            "num_layers": _MAX_LAYERS,
            "num_decoder_layers": _MAX_LAYERS,
        }
        for k, limit in limits.items():
            v = data[k]
            if type(v) is not int or not 0 < v <= limit:
                raise BackboneMismatch(f"adapter metadata 'backbone.{k}' must be an integer in 1..{limit}")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})  # type: ignore[arg-type]

    def check(self, other: Fingerprint) -> None:
        """Raise BackboneMismatch naming the first field where `other` (the adapter's) differs."""
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise BackboneMismatch(
                    f"adapter was made for another backbone: {name} is {theirs!r}, this backbone has {mine!r}"
                )


def fingerprint_of(model: T5) -> Fingerprint:
    """Fingerprint a float32 model; call before any dtype cast so every dtype agrees."""
    cfg = model.config
    arch = {k: getattr(cfg, k, None) for k in _ARCH_KEYS}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    last_ffn = model.decoder.block[-1].layer[-1].DenseReluDense.wo.weight
    for tensor in (model.shared.weight, model.encoder.block[0].layer[0].SelfAttention.q.weight, last_ffn):
        h.update(tensor.detach().float().flatten()[:_SAMPLE].contiguous().numpy().tobytes())
    return Fingerprint(
        model_type=cfg.model_type,
        d_model=cfg.d_model,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        vocab_size=cfg.vocab_size,
        d_ff=cfg.d_ff,
        d_attn=cfg.num_heads * cfg.d_kv,
        digest=h.hexdigest()[:32],
    )


@dataclass
class Backbone:
    model: T5
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    fingerprint: Fingerprint
    source: str
    # The served weights by their transformers names, taken before any adapter site wraps a module (the same
    # tensors, no copy): what an import that carries backbone weights is compared with.
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise KronserveError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


def load_backbone(source: str, device: str = "auto", dtype: str = "float32") -> Backbone:
    """Load a T5 checkpoint (hub id or directory) frozen, in eval mode, on `device` in `dtype`.

    Half precision goes through transformers' own dtype handling (`from_pretrained(dtype=...)`), so the model
    is the one transformers gives: in float16, T5's `_keep_in_fp32_modules` (the feed-forward output `wo`, where
    real checkpoints overflow float16) stay float32. The fingerprint is always taken from a float32 load (so
    every dtype agrees), which is then dropped: a half-precision start loads the checkpoint twice.
    """
    if dtype not in DTYPES:
        raise KronserveError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dev = resolve_device(device)
    local = locate(source)
    model = T5.from_pretrained(source, dtype=torch.float32, local_files_only=local)
    fingerprint = fingerprint_of(model)
    if DTYPES[dtype] != torch.float32:
        del model
        model = T5.from_pretrained(source, dtype=DTYPES[dtype], local_files_only=local)
    model = model.to(device=dev).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    tokenizer.padding_side = "right"  # score() shifts right-padded labels into decoder inputs
    return Backbone(model, tokenizer, dev, DTYPES[dtype], fingerprint, source, dict(model.state_dict()))


def write_tiny_backbone(out_dir: str | Path, shape: Shape = "tiny", seed: int = 0, local: bool = False) -> Path:
    """Save a randomly initialized T5 of a real shape with ByT5's byte tokenizer (needs no download).

    `local`: the first encoder layer attends to nearby bytes (see `_attend_locally`).
    """
    out = Path(out_dir)
    config = t5_config(shape)
    torch.manual_seed(seed)
    model = T5(config).eval()
    if local:
        _attend_locally(model)
    model.save_pretrained(out)
    ByT5Tokenizer().save_pretrained(out)
    return out


def t5_config(shape: Shape, **overrides: int) -> T5Config:
    """A T5 v1 config of a real shape (pad 0 is the decoder start, EOS 1), with `overrides` (another vocab_size)."""
    if shape not in SHAPES:
        raise KronserveError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    return T5Config(
        **{**SHAPES[shape], **overrides},
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def _attend_locally(model: T5) -> None:
    """Give each head of the first encoder layer one relative offset (-2, -1, 0, +1, ...) to look at.

    A random T5's attention is near uniform, so every position sees the same bag of bytes and no adapter can tell
    "great" from "grate" in reasonable time. A pretrained T5's lower layers attend locally; setting the relative
    position bias this way gives the random demo backbone that one property, so its byte n-grams become words an
    adapter learns from in seconds. The weights stay a plain T5 checkpoint.
    """
    attention = model.encoder.block[0].layer[0].SelfAttention
    cfg = model.config
    bias = attention.relative_attention_bias.weight  # [buckets, heads]
    offsets = torch.tensor([o for o in range(-2, 3)])
    buckets = attention._relative_position_bucket(
        offsets, True, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
    )
    with torch.no_grad():
        bias.fill_(-_LOCAL_BIAS)
        for head in range(bias.shape[1]):
            bias[buckets[head % len(offsets)], head] = _LOCAL_BIAS


_LOCAL_BIAS = 6.0  # exp(12) to one: a head looks at its offset alone
DEFAULT_HUB_ID = "google-t5/t5-small"
DEMO_BACKBONE = "demo-backbone-tiny-local-seed0"  # a new name whenever what write_tiny_backbone writes here changes


def default_backbone(cache_dir: Path) -> str:
    """`t5-small` when it is cached or the hub answers; else an offline demo backbone built on the spot."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(DEFAULT_HUB_ID, "config.json"), str):
        log.info("no backbone named: %s, from the hub's cache", DEFAULT_HUB_ID)
        return DEFAULT_HUB_ID
    why = hub_unreachable()
    if why is None:
        log.info("no backbone named: %s, from the hub", DEFAULT_HUB_ID)
        return DEFAULT_HUB_ID
    demo = demo_backbone(cache_dir)
    log.warning(
        "no backbone named, and %s cannot be fetched (%s): serving the offline demo backbone %s, a tiny random T5 "
        "with demo tasks; name a backbone with --backbone",
        DEFAULT_HUB_ID,
        why,
        demo,
    )
    return str(demo)


def demo_backbone(cache_dir: Path) -> Path:
    """The offline demo backbone: a tiny random T5 that attends locally, small enough to train the demo tasks
    on at first start (kronserve.demo)."""
    demo = Path(cache_dir) / DEMO_BACKBONE
    if not (demo / "config.json").is_file():
        write_tiny_backbone(demo, "tiny", seed=0, local=True)
    return demo
