"""A synthetic official SeqTR checkpoint: the official key names and shapes, random values.

No official SeqTR file exists locally, so tests (ours and the server's) need a stand-in.
The names are enumerated here by hand from the official checkpoint layout (mmcv
``ConvModule`` naming, DarknetBlock ``module_list.{j}.{0,1}``, ``lan_enc.lstm`` GRU
tensors, ...), deliberately *not* taken from :class:`models.seqtr.model.SeqTR`: a strict
load of this dict is then a check of the model's naming, not a tautology.  The wrapper mirrors ``save_checkpoint``
(``state_dict``, ``ema_state_dict``, ``epoch``, ``optimizer``, ...).

Values are random but tame: conv weights N(0, 1/fan_in), BN statistics near identity, so
a forward pass on 0-255 pixels stays finite.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

WORD_DIM, GRU, D, FFN, NUM_BIN = 300, 512, 256, 1024, 1000

# (index, kind, spec): conv = (cout, cin, k); block = (channels, n)
DARKNET = [
    (0, "conv", (32, 3, 3)), (1, "conv", (64, 32, 3)), (2, "block", (64, 1)),
    (3, "conv", (128, 64, 3)), (4, "block", (128, 2)), (5, "conv", (256, 128, 3)), (6, "block", (256, 8)),
    (7, "conv", (512, 256, 3)), (8, "block", (512, 8)), (9, "conv", (1024, 512, 3)), (10, "block", (1024, 4)),
    (11, "block", (1024, 2)), (12, "conv", (512, 1024, 1)), (13, "conv", (1024, 512, 3)),
]
FUSION = [("down_bot2mid.1", (256, 256, 3)), ("down_mid2top.1", (768, 768, 3)),
          ("top_project.0", (1792, 1792, 3)), ("top_project.1", (1024, 1792, 1))]


def official_shapes(task: str = "det", n: int = 12, vocab_size: int = 1000) -> "OrderedDict[str, tuple]":
    """Key -> shape of the official single-task model (``()`` marks num_batches_tracked)."""
    if task not in ("det", "segm"):
        raise ValueError("task must be 'det' or 'segm' (multi-task has no released checkpoint)")
    s: OrderedDict[str, tuple] = OrderedDict()

    def conv(prefix: str, cout: int, cin: int, k: int) -> None:
        s[f"{prefix}.conv.weight"] = (cout, cin, k, k)
        for b in ("weight", "bias", "running_mean", "running_var"):
            s[f"{prefix}.bn.{b}"] = (cout,)
        s[f"{prefix}.bn.num_batches_tracked"] = ()

    for idx, kind, spec in DARKNET:
        p = f"vis_enc.darknet.{idx}"
        if kind == "conv":
            conv(p, *spec)
        else:
            c, nb = spec
            for j in range(nb):
                conv(f"{p}.module_list.{j}.0", c // 2, c, 1)
                conv(f"{p}.module_list.{j}.1", c, c // 2, 3)
    s["lan_enc.embedding.weight"] = (vocab_size, WORD_DIM)
    for suf in ("", "_reverse"):
        s[f"lan_enc.lstm.weight_ih_l0{suf}"] = (3 * GRU, WORD_DIM)
        s[f"lan_enc.lstm.weight_hh_l0{suf}"] = (3 * GRU, GRU)
        s[f"lan_enc.lstm.bias_ih_l0{suf}"] = (3 * GRU,)
        s[f"lan_enc.lstm.bias_hh_l0{suf}"] = (3 * GRU,)

    def attn(prefix: str) -> None:
        s[f"{prefix}.in_proj_weight"] = (3 * D, D)
        s[f"{prefix}.in_proj_bias"] = (3 * D,)
        s[f"{prefix}.out_proj.weight"] = (D, D)
        s[f"{prefix}.out_proj.bias"] = (D,)

    def ffn_norms(prefix: str, norms: int) -> None:
        s[f"{prefix}.linear1.weight"], s[f"{prefix}.linear1.bias"] = (FFN, D), (FFN,)
        s[f"{prefix}.linear2.weight"], s[f"{prefix}.linear2.bias"] = (D, FFN), (D,)
        for i in range(1, norms + 1):
            s[f"{prefix}.norm{i}.weight"], s[f"{prefix}.norm{i}.bias"] = (D,), (D,)

    t = "head.transformer"
    for i in range(6):
        attn(f"{t}.encoder.layers.{i}.self_attn")
        ffn_norms(f"{t}.encoder.layers.{i}", 2)
    for i in range(3):
        attn(f"{t}.decoder.layers.{i}.self_attn")
        attn(f"{t}.decoder.layers.{i}.multihead_attn")
        ffn_norms(f"{t}.decoder.layers.{i}", 3)
    s[f"{t}.decoder.norm.weight"], s[f"{t}.decoder.norm.bias"] = (D,), (D,)
    s[f"{t}.seq_positional_encoding.embedding.weight"] = (5 if task == "det" else 2 * n + 1, D)
    s[f"{t}.query_embedding.weight"] = (NUM_BIN + 1, D)
    s[f"{t}.input_proj.conv.weight"], s[f"{t}.input_proj.conv.bias"] = (D, 2 * GRU, 1, 1), (D,)
    s[f"{t}.input_proj.gn.weight"], s[f"{t}.input_proj.gn.bias"] = (D,), (D,)
    for i, out in enumerate((D, D, NUM_BIN + 1)):
        s[f"head.predictor.{i}.fc.weight"], s[f"head.predictor.{i}.fc.bias"] = (out, D), (out,)
    for name, spec in FUSION:
        conv(f"fusion.{name}", *spec)
    return s


def _value(key: str, shape: tuple, g: torch.Generator) -> torch.Tensor:
    if key.endswith("num_batches_tracked"):
        return torch.tensor(1000, dtype=torch.int64)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=g) + 0.5
    if key.endswith("running_mean") or key.endswith("bias"):
        return torch.randn(shape, generator=g) * 0.02
    if key.endswith("bn.weight") or ".norm" in key or key.endswith("gn.weight"):
        return 1 + torch.randn(shape, generator=g) * 0.05
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def synthesise_official_state_dict(task: str = "det", N: int = 12, vocab_size: int = 1000, seed: int = 0,  # noqa: N803
                                   module_prefix: bool = False) -> dict:
    """A ``save_checkpoint``-style dict with random ``state_dict`` and ``ema_state_dict``.

    The EMA set shares every tensor except the predictor's output bias (+1), so a test
    can tell which set was loaded without doubling ~420 MB of memory.
    """
    g = torch.Generator().manual_seed(seed)
    prefix = "module." if module_prefix else ""
    sd = OrderedDict((prefix + k, _value(k, shp, g)) for k, shp in official_shapes(task, N, vocab_size).items())
    ema = OrderedDict(sd)
    bias = prefix + "head.predictor.2.fc.bias"
    ema[bias] = sd[bias] + 1.0
    return {"state_dict": sd, "ema_state_dict": ema, "optimizer": {"state": {}, "param_groups": []},
            "scheduler": {"last_epoch": 59}, "lr": 5e-6, "epoch": 59,
            "d_acc": 81.2, "miou": 0.0, "best_d_acc": 81.2, "best_miou": 0.0}


def main(argv: list[str] | None = None) -> None:
    """Write a synthesised official-layout checkpoint and a matching ``token_to_ix.pkl``, so
    the official loading path can be exercised end to end without the authors' files:

        python -m models.seqtr.official_layout --out /tmp/seqtr-official
        ANYTIME_SEQTR_CHECKPOINTS='["/tmp/seqtr-official/det_synthetic.pth"]' \\
        ANYTIME_SEQTR_TOKEN_TO_IX=/tmp/seqtr-official/token_to_ix.pkl ANYTIME_SEQTR_LONG_SIDES='[320]' make serve
    """
    import argparse
    import pickle
    from pathlib import Path

    ap = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for <task>_synthetic.pth and token_to_ix.pkl")
    ap.add_argument("--task", choices=("det", "segm"), default="det")
    ap.add_argument("--num-points", type=int, default=12, help="N of a segm checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--module-prefix", action="store_true", help="keys as saved under DDP ('module.')")
    args = ap.parse_args(argv)
    from models.seqtr.scenes import vocabulary_words

    words = vocabulary_words()
    token_to_ix = {"PAD": 0, "UNK": 1, "CLS": 2, **{w: i + 3 for i, w in enumerate(words)}}
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = synthesise_official_state_dict(args.task, args.num_points, len(token_to_ix), args.seed, args.module_prefix)
    path = args.out / f"{args.task}_synthetic.pth"
    torch.save(ckpt, path)
    with open(args.out / "token_to_ix.pkl", "wb") as f:
        pickle.dump(token_to_ix, f)
    print(f"wrote {path} ({len(ckpt['state_dict'])} tensors, random values) and {args.out / 'token_to_ix.pkl'} "
          f"({len(token_to_ix)} entries)")


if __name__ == "__main__":
    main()
