"""Real int8 rungs for a PSS-Net bundle, calibrated without data, measured on held-out data.

    python -m models.pssnet.quantize models/pssnet/weights/pss-mbv1-glyphs
    python -m models.pssnet.quantize BUNDLE --calibration real --n 512     # the real-data baseline
    python -m models.pssnet.quantize BUNDLE --calibration fdda --n 108 --steps 200
    python -m models.pssnet.quantize BUNDLE --calibration real --n 512 --rungs clr-l1-f10   # add one rung

For every rung of the ladder (the subnets and variants the planner climbs), or the rungs
``--rungs`` names (entries of other rungs already in the bundle are kept): synthesise calibration
inputs from the rung's own BatchNorm statistics (``--calibration bns``: no image needed,
what an official checkpoint without its data can use too; ``intraq``: the same, with
IntraQ's class-aware losses; ``fdda``: with FDDA's, which also read ONE real training image
per class, drawn by ``--seed``; see ``compress.synthesis``), or take ``real`` training-split
images, or ``noise``; quantize the rung to int8 (``PssNetModel.int8``), and measure top-1 on
the held-out val and test splits next to the fp32 rung.  Writes into the bundle:

* ``int8_observers.safetensors``: per rung, the int8 network's observers' state after those
  inputs, from which the server rebuilds it without running them (the same network);
* ``int8_calibration.safetensors``: the calibration inputs (float16; one set per rung when
  synthesised from the rung's statistics, one shared set otherwise, stored once however many
  rungs use it: each entry names its set as ``calibration.key``), from which the server
  rebuilds exactly the measured int8 rung at start-up (about 1.5 s each);
* ``int8.json``: per rung, a ``compress.artifact.RungArtifact``: method, bits, backend,
  held-out quality, ``real_speed: true``, the calibration and this command; where OpenVINO is
  installed, also ``engine_quality.openvino``: the held-out quality of the same rung quantized
  from the same inputs by ONNX Runtime's quantizer and run on OpenVINO's int8 kernels, which
  the server may then serve it on (``models.common.engines``).  ``--engine-quality`` adds
  that to a bundle's existing entries without calibrating anything again.

Synthesis takes about 15 s (the smallest rung) to 60 s (the largest) per rung on one core
(BNS at the defaults); FDDA and IntraQ cost about as much per image and step.
``python -m bench.calibration_methods`` compares the sources.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compress.artifact import RungArtifact, bundle_dir, command_line, top1, write
from compress.calibration import batches_of, bn_statistics_synthesis, gaussian_batches, one_per_class

INT8_MANIFEST = "int8.json"
INT8_CALIBRATION = "int8_calibration.safetensors"
INT8_OBSERVERS = "int8_observers.safetensors"  # per rung, the observers' state after its inputs
SHARED = "shared"  # the key of a calibration set every rung uses
SOURCES = ("bns", "real", "noise", "fdda", "intraq")
PER_RUNG = ("bns", "fdda", "intraq")  # synthesised from each rung's own network: one set per rung
# An OpenVINO int8 graph is calibrated on the first this many of a rung's stored inputs: the
# server makes it at start-up, and ONNX Runtime's calibration takes 0.9 s per rung on 512
# inputs, 0.3 s on 128.
OPENVINO_CALIBRATION_INPUTS = 128
FDDA_POOL = 512  # FDDA's one image per class is drawn from the first FDDA_POOL training images


def load_int8(model, path: str | Path) -> dict[int, tuple[torch.nn.Module, dict]]:
    """The int8 rungs a bundle's ``int8.json`` describes, rebuilt from their stored
    calibration: rung index -> (int8 module, its artifact entry).  Empty without one.  Where
    the bundle keeps the observers' state of a rung (``INT8_OBSERVERS``) the rung is rebuilt
    from it, which is the same network without running the observers over the inputs (most of
    start-up's int8 time: 18 of 26 s for the bundled 8 rungs)."""
    folder = bundle_dir(path)
    if not (folder / INT8_MANIFEST).exists():
        return {}
    manifest = json.loads((folder / INT8_MANIFEST).read_text())
    calibration = load_file(str(folder / INT8_CALIBRATION))
    observers = load_file(str(folder / INT8_OBSERVERS)) if (folder / INT8_OBSERVERS).exists() else {}
    by_name = {r.name: r for r in model.rungs}
    out = {}
    for entry in manifest["rungs"]:
        rung = by_name.get(entry["rung"])
        inputs = stored_inputs(calibration, entry)
        if rung is None or inputs is None:
            continue
        prefix = f"{entry['rung']}::"
        state = {k[len(prefix):]: v for k, v in observers.items() if k.startswith(prefix)}
        out[rung.index] = (model.int8(rung.index, state or batches_of(inputs.float())), entry)
        model.int8_calibration[rung.index] = inputs
    return out


def stored_inputs(calibration: dict[str, torch.Tensor], entry: dict) -> torch.Tensor | None:
    """The calibration inputs of an ``int8.json`` entry among a bundle's stored sets."""
    key = entry.get("calibration", {}).get("key")
    return calibration.get(key) if key else calibration.get(entry["rung"], calibration.get(SHARED))


def write_observers(model, folder: Path, entries: list[dict], calibration: dict[str, torch.Tensor]) -> None:
    """``INT8_OBSERVERS``: each entry's observers' state after its stored inputs, so that the
    server rebuilds the rung without running them (``load_int8``)."""
    by_name = {r.name: r for r in model.rungs}
    state = {}
    for entry in entries:
        rung, inputs = by_name.get(entry["rung"]), stored_inputs(calibration, entry)
        if rung is not None and inputs is not None:
            for k, v in model.int8_observers(rung.index, batches_of(inputs.float())).items():
                state[f"{entry['rung']}::{k}"] = v
    save_file(state, str(folder / INT8_OBSERVERS))


def calibration_key(stored: dict[str, torch.Tensor], rung: str, inputs: torch.Tensor, per_rung: bool) -> str:
    """Where ``inputs`` go in ``stored`` (added there): under the rung's name when made for
    it alone, else under the key of an identical shared set already stored, or a new one."""
    if per_rung:
        stored[rung] = inputs
        return rung
    for key, t in stored.items():
        if key.startswith(SHARED) and t.shape == inputs.shape and torch.equal(t, inputs):
            return key
    key = SHARED if SHARED not in stored else f"{SHARED}-{sum(k.startswith(SHARED) for k in stored)}"
    stored[key] = inputs
    return key


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (separate from ``main`` so that they can be checked without a run)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--calibration", choices=list(SOURCES), default="bns")
    ap.add_argument("--n", type=int, default=64, help="calibration inputs per rung")
    ap.add_argument("--steps", type=int, default=100, help="synthesis (bns, fdda, intraq): Adam steps per batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rungs", nargs="+", default=None, help="only these rungs (default: the ladder); the "
                    "bundle's int8 entries for other rungs are kept")
    ap.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    ap.add_argument("--observers", action="store_true", help="calibrate nothing: store each existing entry's "
                    f"observers' state after its stored inputs ({INT8_OBSERVERS}; the server then skips that pass)")
    ap.add_argument("--engine-quality", action="store_true", help="calibrate nothing: measure the existing int8 "
                    "entries on OpenVINO's int8 kernels (from their stored inputs) and add that quality to them")
    return ap


def openvino_quality(model, rung_index: int, inputs: torch.Tensor, held_out: dict) -> dict:
    """Held-out top-1 of rung ``rung_index`` quantized from ``inputs`` (the first
    ``OPENVINO_CALIBRATION_INPUTS``) by ONNX Runtime's
    quantizer and run on OpenVINO's int8 kernels (what ``engine=auto`` may serve it on), with
    the stem convolution in int8 or in float, whichever is more accurate on val (recorded as
    ``stem_in_float``: the server builds the same graph)."""
    from models.common.engines import OpenVinoNetwork, export_onnx, int8_qdq

    net, x = model.int8_graph_inputs(rung_index, inputs[:OPENVINO_CALIBRATION_INPUTS])  # as the server makes it
    graph = export_onnx(net, x[:1])
    best = None
    for stem_in_float in (True, False):
        runner = OpenVinoNetwork(int8_qdq(graph, x, stem_in_float=stem_in_float), torch.get_num_threads())
        quality = {f"{split}_accuracy": round(top1(runner, xs, ys), 4) for split, (xs, ys) in held_out.items()}
        if best is None or quality["val_accuracy"] > best["val_accuracy"]:
            best = {**quality, "stem_in_float": stem_in_float}
    return best


def add_engine_quality(entries: list[dict], model, stored: dict[str, torch.Tensor], held_out: dict,
                       say, command: str) -> None:
    """``engine_quality.openvino`` for every entry whose rung and inputs are here (in place)."""
    from importlib.metadata import version

    by_name = {r.name: r for r in model.rungs}
    for entry in entries:
        rung = by_name.get(entry["rung"])
        inputs = stored_inputs(stored, entry)
        if rung is None or inputs is None:
            continue
        quality = openvino_quality(model, rung.index, inputs, held_out)
        entry.setdefault("engine_quality", {})["openvino"] = {
            **quality, "backend": f"OpenVINO {version('openvino')} CPU int8, QDQ graph from onnxruntime "
                                  f"{version('onnxruntime')}'s static quantizer (MinMax, per-channel weights)",
            "command": command}
        say(f"{rung.name}: OpenVINO int8 test {quality['test_accuracy']:.4f} "
            f"(torch.ao {entry['quality']['test_accuracy']:.4f})")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from models.glyphs.data import load_split
    from models.pssnet.serving import PssNetModel

    def say(msg: str) -> None:
        print(f"[int8] {msg}", file=sys.stderr, flush=True)

    model = PssNetModel.from_checkpoint(args.bundle, int8=False)
    say("rendering the held-out val and test splits")
    held_out = {}
    for split in ("val", "test"):
        s = load_split(split)
        held_out[split] = (torch.stack([model.preprocess(i) for i in s.images]), torch.from_numpy(s.labels))
    real = None
    if args.calibration == "real":
        train = load_split("train", n=args.n)
        real = torch.stack([model.preprocess(i) for i in train.images])
    one_each = None
    if args.calibration == "fdda":  # FDDA's labelled real data: one training image per class
        pool = load_split("train", n=FDDA_POOL)
        idx = one_per_class(pool.labels, args.seed)
        one_each = (torch.stack([model.preprocess(pool.images[i]) for i in idx.tolist()]),
                    torch.from_numpy(pool.labels[idx.numpy()]))
    extra = {}
    folder = bundle_dir(args.bundle)
    stored, artifacts = {}, []
    if (folder / INT8_MANIFEST).exists():  # kept: the entries of rungs this run does not make
        stored = load_file(str(folder / INT8_CALIBRATION))
        artifacts = json.loads((folder / INT8_MANIFEST).read_text())["rungs"]
    by_name = {r.name: r for r in model.rungs}
    if args.observers:
        write_observers(model, folder, artifacts, stored)
        say(f"wrote {folder / INT8_OBSERVERS}")
        return
    if args.engine_quality:
        from models.common.engines import OPENVINO, require

        require(OPENVINO)
        add_engine_quality(artifacts, model, stored, held_out, say, command_line("models.pssnet.quantize", argv))
        if not args.dry_run:
            top = {k: v for k, v in json.loads((folder / INT8_MANIFEST).read_text()).items() if k != "rungs"}
            write(folder / INT8_MANIFEST, artifacts, **top)
            say(f"wrote {folder / INT8_MANIFEST}")
        return
    unknown = [n for n in args.rungs or [] if n not in by_name]
    if unknown:
        raise SystemExit(f"--rungs: {', '.join(unknown)} not rungs of {model.name} ({', '.join(by_name)})")
    todo = [by_name[n] for n in args.rungs] if args.rungs else model.ladder
    artifacts = [a for a in artifacts if a["rung"] not in {r.name for r in todo}]
    made = []
    for rung in todo:
        t0 = time.perf_counter()
        res = rung.resolution
        progress = lambda m, r=rung.name: say(f"{r}: {m}")  # noqa: E731
        if args.calibration == "bns":
            dense, layers = model.with_bn(rung.index)
            calib = bn_statistics_synthesis(dense, (3, res, res), args.n, steps=args.steps, seed=args.seed,
                                            layers=layers, progress=progress)
        elif args.calibration in ("fdda", "intraq"):
            from compress.synthesis import fdda_centres, fdda_synthesis, intraq_synthesis

            dense, layers = model.with_bn(rung.index)
            if args.calibration == "fdda":
                centres = fdda_centres(dense, *one_each, layers=layers)
                synthetic = fdda_synthesis(dense, (3, res, res), centres, args.n, steps=args.steps, seed=args.seed,
                                           layers=layers, progress=progress)
                extra = {"real_images": {"split": "train", "per_class": 1, "pool": FDDA_POOL,
                                         "count": len(one_each[1])}}
            else:
                synthetic = intraq_synthesis(dense, (3, res, res), len(model.classes), args.n, steps=args.steps,
                                             seed=args.seed, layers=layers, progress=progress)
            calib = synthetic.inputs
            extra = {**extra, "settings": {k: v for k, v in synthetic.info.items()
                                           if k not in ("final_losses", "seconds")}}
        elif args.calibration == "real":
            calib = real
        else:
            calib = torch.cat(gaussian_batches(tuple(held_out["val"][0].shape[1:]), args.n, seed=args.seed))
        q = model.int8(rung.index, batches_of(calib))
        quality = {}
        for split, (x, y) in held_out.items():
            quality[f"{split}_accuracy"] = round(top1(q, x, y), 4)
            quality[f"{split}_accuracy_fp32"] = round(top1(lambda b, i=rung.index: model.forward(i, b), x, y), 4)
        say(f"{rung.name}: int8 test {quality['test_accuracy']:.4f} vs fp32 {quality['test_accuracy_fp32']:.4f} "
            f"({time.perf_counter() - t0:.0f} s)")
        key = calibration_key(stored, rung.name, calib.half().contiguous(), args.calibration in PER_RUNG)
        made.append(RungArtifact(
            rung.name, "ptq-static", {"weights": 8, "activations": 8}, "torch.ao onednn (stem in float)", True,
            quality, {"source": args.calibration, "n": args.n,
                      "steps": args.steps if args.calibration in PER_RUNG else None,
                      "seed": args.seed, "resolution": res, "key": key, **extra},
            command_line("models.pssnet.quantize", argv)))
    made = [a.to_dict() for a in made]
    from models.common.engines import OPENVINO, available

    if available(OPENVINO):  # what engine=auto may serve these rungs on
        add_engine_quality(made, model, stored, held_out, say, command_line("models.pssnet.quantize", argv))
    print(json.dumps(made, indent=2))
    artifacts = sorted(artifacts + made, key=lambda a: by_name[a["rung"]].flops
                       if a["rung"] in by_name else 0.0)
    used = {a["calibration"].get("key") or (a["rung"] if a["rung"] in stored else SHARED) for a in artifacts}
    stored = {k: v for k, v in stored.items() if k in used}
    if not args.dry_run:
        save_file(stored, str(folder / INT8_CALIBRATION))
        write_observers(model, folder, artifacts, stored)
        write(folder / INT8_MANIFEST, artifacts, model=model.name,
              note="real int8 (oneDNN) rungs; quality is top-1 on the glyph set's held-out val and test splits")
        say(f"wrote {folder / INT8_MANIFEST} and {folder / INT8_CALIBRATION}")


if __name__ == "__main__":
    main()
