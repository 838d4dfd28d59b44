"""Compression toolkit: rungs that are really cheaper, one job per module, no web framework.

    int8.py         post-training int8 on real kernels: static (convolutions and linears,
                    calibrated) and dynamic (linears, no calibration)
    calibration.py  calibration batches: real images, Gaussian noise
    fakequant.py    simulated k-bit quantizers for quantization-aware training: DDTB's
                    dynamic dual trainable bounds, a PAMS-like symmetric baseline
    qat.py          8-bit quantization-aware training with DDTB's trainable bounds, exported
                    to real int8 kernels (torch.ao graph mode, oneDNN)
    bf16.py         bf16 sections of a float network (no data, no training): real speed on
                    CPUs with AVX512-BF16 / AMX and on GPUs
    artifact.py     a compressed rung's manifest: method, bits, backend, held-out quality,
                    whether its speed is real, the exact command that made it

Engines are chosen by measurement (docs/COMPRESSION.md): on torch 2.13 CPU the real int8
kernels reachable without a new dependency are torch.ao's quantized ops (oneDNN); they are
what this toolkit uses until another engine earns its place.
"""
