"""The official PSS-Net state-dict layout (``checkpoint_*.pt``, ``module.`` stripped), written
out by hand rather than derived from our modules, so that tests comparing the two really check compatibility."""

from __future__ import annotations


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.bn.running_mean": (c,),
            f"{prefix}.bn.running_var": (c,), f"{prefix}.bn.num_batches_tracked": ()}


def mbv1_layout(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Official MBV1: stem conv + BN; 13 blocks of dw (C_in,1,3,3) + BN + pw (C_out,C_in,1,1) + BN;
    classifier.0 (1000, 1024).  No conv biases."""
    widths = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    keys = {"features.0.0.weight": (32, 3, 3, 3), **_bn("features.0.1", 32)}
    for i in range(1, 14):
        cin, cout = widths[i - 1], widths[i]
        keys[f"features.{i}.0.weight"] = (cin, 1, 3, 3)
        keys.update(_bn(f"features.{i}.1", cin))
        keys[f"features.{i}.3.weight"] = (cout, cin, 1, 1)
        keys.update(_bn(f"features.{i}.4", cout))
    keys["classifier.0.weight"] = (num_classes, 1024)
    keys["classifier.0.bias"] = (num_classes,)
    return keys


def mbv2_layout(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Official MBV2: stem; features.1 (dw 32, pw 32->16); features.2..17 (expand 6C_in, dw, project);
    features.18 (1280, 320, 1, 1) + BN; classifier.0 (1000, 1280)."""
    keys = {"features.0.0.weight": (32, 3, 3, 3), **_bn("features.0.1", 32)}
    keys["features.1.body.0.weight"] = (32, 1, 3, 3)
    keys.update(_bn("features.1.body.1", 32))
    keys["features.1.body.3.weight"] = (16, 32, 1, 1)
    keys.update(_bn("features.1.body.4", 16))
    # The standard MobileNet-V2 stages after the first: (channels, blocks).
    cin, idx = 16, 2
    for cout, n in [(24, 2), (32, 3), (64, 4), (96, 3), (160, 3), (320, 1)]:
        for _ in range(n):
            mid = 6 * cin
            p = f"features.{idx}.body"
            keys[f"{p}.0.weight"] = (mid, cin, 1, 1)
            keys.update(_bn(f"{p}.1", mid))
            keys[f"{p}.3.weight"] = (mid, 1, 3, 3)
            keys.update(_bn(f"{p}.4", mid))
            keys[f"{p}.6.weight"] = (cout, mid, 1, 1)
            keys.update(_bn(f"{p}.7", cout))
            cin, idx = cout, idx + 1
    keys["features.18.0.weight"] = (1280, 320, 1, 1)
    keys.update(_bn("features.18.1", 1280))
    keys["classifier.0.weight"] = (num_classes, 1280)
    keys["classifier.0.bias"] = (num_classes,)
    return keys


LAYOUTS = {"mobilenet_v1": mbv1_layout, "mobilenet_v2": mbv2_layout}
