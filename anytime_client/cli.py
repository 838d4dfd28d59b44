"""``anytime-serve``: the command line for a running server, and for starting one.

    anytime-serve superresolve photo.png --deadline-ms 300 -o photo_x4.png
    anytime-serve classify glyph.png --top-k 3
    anytime-serve ground scene.png "the red circle left of the square" --task mask
    anytime-serve models
    anytime-serve serve                      # the server itself (as python -m service)

The server's address comes from ``--url`` or ANYTIME_URL (default http://127.0.0.1:8000),
the token from ``--token`` or ANYTIME_TOKEN.  Answers go to stdout as JSON (the image of
/superresolve to ``-o``); a line on stderr says which rung served the request and what it
cost.  A shed request (429/503) is retried after its Retry-After while the deadline leaves
time; the exit status is 0 when served, 3 when shed, 2 for a bad request, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import httpx

from anytime_client.client import Client, Result, RetryPolicy, ServerError, Shed, SuperResolution


def parser() -> argparse.ArgumentParser:
    def connection(parser: argparse.ArgumentParser, defaults: bool) -> argparse.ArgumentParser:
        """The connection options, accepted before or after the command."""
        d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
        parser.add_argument("--url", default=d(os.environ.get("ANYTIME_URL", "http://127.0.0.1:8000")))
        parser.add_argument("--token", default=d(os.environ.get("ANYTIME_TOKEN")))
        parser.add_argument("--retries", type=int, default=d(4), help="attempts in all (default 4)")
        parser.add_argument("--timeout-s", type=float, default=d(60.0), help="HTTP timeout per attempt")
        return parser

    p = connection(argparse.ArgumentParser(prog="anytime-serve", description=__doc__.split("\n\n")[0],
                                           formatter_class=argparse.RawDescriptionHelpFormatter,
                                           epilog=__doc__.split("\n\n", 1)[1]), defaults=True)
    shared = connection(argparse.ArgumentParser(add_help=False), defaults=False)
    sub = p.add_subparsers(dest="command", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("image", help="an image file (PNG, JPEG, WebP)")
        s.add_argument("--deadline-ms", type=float, help="answer within this many ms (it shrinks across retries)")
        s.add_argument("--budget", help="a number in [0, 1] or 'auto'")
        s.add_argument("--min-budget", type=float)
        s.add_argument("--model", help="a model from `anytime-serve models`")
        s.add_argument("--rung", help="serve at this rung")
        s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="any other query parameter of the endpoint (repeatable)")

    s = sub.add_parser("superresolve", help="x4 super-resolution", parents=[shared])
    common(s)
    s.add_argument("-o", "--output", required=True, help="where to write the image")
    s = sub.add_parser("classify", help="top-k labels", parents=[shared])
    common(s)
    s.add_argument("--top-k", type=int)
    s = sub.add_parser("ground", help="the box (or mask) a referring expression describes", parents=[shared])
    common(s)
    s.add_argument("expression")
    s.add_argument("--task", choices=["box", "mask"])
    sub.add_parser("models", help="list the served models and their rungs", parents=[shared])
    sub.add_parser("serve", help="start the server (settings: ANYTIME_* variables or ANYTIME_CONFIG)")
    return p


def summary(r: Result) -> str:
    parts = [f"model {r.model}", f"rung {r.rung}", f"decision {r.decision}",
             f"{100 * r.flops_fraction:.0f}% of full FLOPs"]
    if r.queue_ms is not None and r.compute_ms is not None:
        parts.append(f"queue {r.queue_ms:.1f} ms, compute {r.compute_ms:.1f} ms")
    if r.server_ms is not None:
        parts.append(f"server {r.server_ms:.1f} ms")
    if r.attempts > 1:
        parts.append(f"{r.attempts} attempts")
    return ", ".join(parts)


def query(args: argparse.Namespace) -> dict[str, Any]:
    q: dict[str, Any] = {"budget": args.budget, "min_budget": args.min_budget, "model": args.model, "rung": args.rung}
    for extra in ("top_k", "task"):
        if getattr(args, extra, None) is not None:
            q[extra] = getattr(args, extra)
    for kv in args.param:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"--param {kv!r}: expected KEY=VALUE")
        q[key] = value
    return q


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        from service.__main__ import main as serve

        serve()
        return 0
    retry = RetryPolicy(attempts=max(1, args.retries))
    try:
        with Client(args.url, token=args.token, timeout_s=args.timeout_s, retry=retry) as c:
            if args.command == "models":
                for m in c.models():
                    rungs = ", ".join(r["name"] + (" (dominated)" if r.get("dominated") else "") for r in m["rungs"])
                    print(f"{m['name']}\t{m['endpoint']}\t{m['family']}\t{rungs}")
                return 0
            q = query(args)
            if args.command == "superresolve":
                r: Result = c.superresolve(args.image, deadline_ms=args.deadline_ms, **q)
            elif args.command == "classify":
                r = c.classify(args.image, deadline_ms=args.deadline_ms, **q)
            else:
                r = c.ground(args.image, args.expression, deadline_ms=args.deadline_ms, **q)
    except Shed as exc:
        print(f"shed after {exc.attempts} attempt(s): {exc}", file=sys.stderr)
        return 3
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if 400 <= exc.status < 500 else 1
    except (httpx.HTTPError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(r), file=sys.stderr)
    if isinstance(r, SuperResolution):
        r.save(args.output)
        print(json.dumps({"output": args.output, "media_type": r.media_type, "rung_mix": r.rung_mix,
                          "predicted_patch_psnr": r.predicted_patch_psnr}))
    else:
        fields = {k: v for k, v in dataclasses.asdict(r).items() if k not in ("headers", "body")}
        print(json.dumps(fields, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
