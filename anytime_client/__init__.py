"""A small Python client for Anytime Serve, on httpx, sync (``Client``) and async
(``AsyncClient``).

    from anytime_client import Client

    with Client("http://127.0.0.1:8000") as c:
        sr = c.superresolve("photo.png", deadline_ms=300)
        sr.save("photo_x4.png"); print(sr.rung, sr.compute_ms)

What it does for you:

* results are typed (``SuperResolution``, ``Classification``, ``Grounding``), parsed from the
  JSON body and the X-Anytime-* headers: which rung served the request, its FLOPs, the
  decision, queue and compute time;
* a deadline travels with the request and shrinks across retries: a retry asks for what is
  left of the deadline set at the first attempt, never the whole of it again;
* 429 (shed) and 503 (warming up, draining) are retried after their Retry-After, with
  jitter so that shed clients do not come back all at once, while the deadline leaves time;
  connection errors are retried with exponential backoff; everything else is an error at
  once (``ServerError``: status, message, what is accepted).

The command line (``anytime-serve superresolve photo.png --deadline-ms 300 -o out.png``) is
``anytime_client.cli``.
"""

from anytime_client.client import (AsyncClient, Classification, Client, Grounding, Prediction, Result, RetryPolicy,
                                   ServerError, Shed, SuperResolution)

__all__ = ["AsyncClient", "Classification", "Client", "Grounding", "Prediction", "Result", "RetryPolicy",
           "ServerError", "Shed", "SuperResolution"]
