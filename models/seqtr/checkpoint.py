"""Loading official SeqTR ``.pth`` files and saving / loading our own bundles.

Official files (written by the official ``save_checkpoint``) are dicts: ``state_dict``,
optionally ``ema_state_dict`` (trained with ``ema=True``), plus optimizer/scheduler state
and metrics.  They are opened with ``torch.load(weights_only=True)``; if torch refuses (an
optimizer or scheduler entry holding some class it does not allow-list) we fall back to a
restricted unpickler that resolves only torch's tensor-rebuild functions, dtypes,
``collections.OrderedDict`` and primitives, and turns every other global into an inert
placeholder, so no code from the file ever runs.

Everything the model needs is read from the tensors: task and N from the
``seq_positional_encoding`` rows (5 -> det, 2N+1 -> segm; multi-task, 2N+6 rows with a
``task_embedding``, is reported as unsupported), vocabulary size and word dim from the
embedding, num_bin from the predictor, widths and depths from the conv / layer shapes.
Not in the file: ``max_token`` (15 for RefCOCO/RefCOCO+, 20 for RefCOCOg; a parameter)
and the dataset's ``token_to_ix.pkl``.

Our bundles are ``model.safetensors`` + ``manifest.json`` (config, vocabulary, extra).
"""

from __future__ import annotations

import json
import pickle
import re
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.seqtr.model import SeqTR, SeqTRConfig
from models.seqtr.text import Vocabulary

# ------------------------------------------------------------------ restricted loading


class _Opaque:
    """Stand-in for any global the restricted unpickler does not admit; it runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return "<opaque object not loaded>"


def _opaque_factory(module: str, name: str) -> type:
    return type(f"Opaque[{module}.{name}]", (_Opaque,), {})


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"), ("torch", "Size"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "str"), ("builtins", "bool"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _opaque_factory(module, name)


def _restricted_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("seqtr_restricted_pickle")
    mod.Unpickler = _RestrictedUnpickler
    mod.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
    mod.__dict__["UnpicklingError"] = pickle.UnpicklingError
    return mod


def read_checkpoint(path: str | Path) -> tuple[dict, str]:
    """The checkpoint object and which loader opened it ('weights_only' or 'restricted')."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), "weights_only"
    except pickle.UnpicklingError:
        pass
    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module())
    return obj, "restricted"


# ------------------------------------------------------------------ config inference


def _strip_module(sd: dict) -> tuple[dict, bool]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}, True
    return dict(sd), False


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def config_from_state_dict(sd: dict[str, torch.Tensor], max_token: int = 15) -> SeqTRConfig:
    """The :class:`SeqTRConfig` whose model has exactly this state dict's shapes."""
    seq_key = "head.transformer.seq_positional_encoding.embedding.weight"
    if seq_key not in sd or "lan_enc.embedding.weight" not in sd:
        raise ValueError("not a SeqTR state dict: no seq_positional_encoding / lan_enc.embedding")
    rows = sd[seq_key].shape[0]
    if "head.task_embedding.weight" in sd:
        n = (rows - 6) // 2
        raise NotImplementedError(f"multi-task SeqTR checkpoint ({rows} sequence rows, N = {n}, task_embedding) "
                                  "is not supported: only single-task det / segm models are")
    if rows == 5:
        task, n = "det", 12
    elif rows % 2 == 1 and rows > 1:
        task, n = "segm", (rows - 1) // 2
    else:
        raise ValueError(f"seq_positional_encoding has {rows} rows: not 5 (det) or 2N+1 (segm)")
    dn = "vis_enc.darknet"
    w = lambda k: sd[k].shape  # noqa: E731
    widths = tuple(int(w(f"{dn}.{i}.conv.weight")[0]) for i in (1, 3, 5, 7, 9))
    blocks = tuple(_count(sd, rf"{dn}\.{i}\.module_list\.(\d+)\.") for i in (2, 4, 6, 8, 10))
    vocab, word_dim = sd["lan_enc.embedding.weight"].shape
    d_model = int(w("head.transformer.query_embedding.weight")[1])
    return SeqTRConfig(
        vocab_size=int(vocab), word_dim=int(word_dim), gru_hidden=int(w("lan_enc.lstm.weight_hh_l0")[1]),
        dark_stem=int(w(f"{dn}.0.conv.weight")[0]), dark_widths=widths, dark_blocks=blocks,
        dark_head_blocks=_count(sd, rf"{dn}\.11\.module_list\.(\d+)\."),
        dark_head_mid=int(w(f"{dn}.12.conv.weight")[0]),
        fuse_bot2mid=int(w("fusion.down_bot2mid.1.conv.weight")[0]),
        fuse_mid2top=int(w("fusion.down_mid2top.1.conv.weight")[0]),
        fuse_top_mid=int(w("fusion.top_project.0.conv.weight")[0]),
        d_model=d_model, ffn=int(w("head.transformer.encoder.layers.0.linear1.weight")[0]),
        enc_layers=_count(sd, r"head\.transformer\.encoder\.layers\.(\d+)\."),
        dec_layers=_count(sd, r"head\.transformer\.decoder\.layers\.(\d+)\."),
        num_bin=int(w("head.predictor.2.fc.weight")[0]) - 1,
        task=task, num_points=n, max_token=max_token)


def build_and_load(cfg: SeqTRConfig, sd: dict[str, torch.Tensor]) -> SeqTR:
    """A model for ``cfg`` with ``sd`` loaded strictly; the error lists every mismatch."""
    with torch.device("meta"):  # no 400 MB random init that would be overwritten anyway
        model = SeqTR(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if missing or unexpected or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:20]) + (f" ... (+{len(keys) - 20})" if len(keys) > 20 else "")
        msg = []
        if missing:
            msg.append(f"missing keys ({len(missing)}): {show(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {show(unexpected)}")
        if wrong:
            msg.append(f"shape mismatches ({len(wrong)}): " + show(
                [f"{k} {tuple(sd[k].shape)} vs {expected[k]}" for k in wrong]))
        raise ValueError("state dict does not match the SeqTR layout: " + "; ".join(msg))
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.lan_enc.embedding.weight.requires_grad_(not cfg.freeze_embedding)
    return model.eval()


def load_official(path: str | Path, token_to_ix_path: str | Path | None = None, which: str = "state_dict",
                  max_token: int = 15) -> tuple[SeqTR, Vocabulary | None, dict]:
    """An official checkpoint (or a bare state dict) -> (model in eval mode, vocabulary, info)."""
    ckpt, loader = read_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} does not hold a checkpoint dict")
    available = [k for k in ("state_dict", "ema_state_dict") if isinstance(ckpt.get(k), dict)]
    if available:
        if which not in available:
            raise KeyError(f"{path} has no {which!r}; available: {available}")
        sd = ckpt[which]
    elif all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd, which, available = ckpt, "bare", ["bare"]
    else:
        raise ValueError(f"{path}: no state_dict / ema_state_dict and not a bare state dict")
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: {which} holds non-tensor values")
    sd, stripped = _strip_module(sd)
    cfg = config_from_state_dict(sd, max_token=max_token)
    model = build_and_load(cfg, sd)
    vocab = None
    if token_to_ix_path is not None:
        vocab = Vocabulary.from_pickle(token_to_ix_path)
        if len(vocab.token_to_ix) != cfg.vocab_size or len(vocab) != cfg.vocab_size:
            raise ValueError(f"token_to_ix has {len(vocab.token_to_ix)} words (max index {len(vocab) - 1}) but "
                             f"the embedding has {cfg.vocab_size} rows: wrong dataset's vocabulary?")
    meta = {k: ckpt[k] for k in ("epoch", "lr", "d_acc", "miou", "best_d_acc", "best_miou")
            if isinstance(ckpt.get(k), (int, float))}
    info = {"task": cfg.task, "num_points": cfg.num_points if cfg.task == "segm" else None,
            "vocab_size": cfg.vocab_size, "num_bin": cfg.num_bin, "max_token": max_token,
            "weights": which, "available": available, "module_prefix": stripped, "loader": loader,
            "num_tensors": len(sd), **meta}
    return model, vocab, info


# ------------------------------------------------------------------------- bundles


def save_bundle(directory: str | Path, model: SeqTR, config: SeqTRConfig, vocab: Vocabulary,
                manifest: dict | None = None) -> Path:
    """``model.safetensors`` + ``manifest.json`` (family, config, vocabulary words, extra)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    words = vocab.words()
    if [vocab.token_to_ix[w] for w in words] != list(range(len(words))):
        raise ValueError("vocabulary indices are not dense 0..V-1")
    if len(words) != config.vocab_size:
        raise ValueError(f"vocabulary has {len(words)} words, config.vocab_size = {config.vocab_size}")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(d / "model.safetensors"))
    body = {"family": "seqtr", **(manifest or {}), "config": config.to_dict(), "vocab_words": words}
    (d / "manifest.json").write_text(json.dumps(body, indent=1))
    return d


def load_bundle(directory: str | Path) -> tuple[SeqTR, Vocabulary, dict]:
    """Inverse of :func:`save_bundle`: (model in eval mode, vocabulary, manifest)."""
    d = Path(directory)
    manifest = json.loads((d / "manifest.json").read_text())
    if manifest.get("family", "seqtr") != "seqtr":
        raise ValueError(f"{d} holds a {manifest.get('family')!r} bundle, not seqtr")
    cfg = SeqTRConfig.from_dict(manifest["config"])
    model = build_and_load(cfg, load_file(str(d / "model.safetensors")))
    vocab = Vocabulary({w: i for i, w in enumerate(manifest["vocab_words"])})
    return model, vocab, manifest


__all__ = ["load_official", "read_checkpoint", "config_from_state_dict", "build_and_load",
           "save_bundle", "load_bundle"]
