"""Inference routes: one POST route per endpoint, built from the families served there.

An endpoint's route only routes: it validates the query against the endpoint's parameter
model, picks the model (``select``) and hands the request to that model's template
(``FamilyService.handle``).  The same ``select`` serves the middleware's quick shed, which
runs before routing, so both always agree on which model a request reaches.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from service.errors import ApiError, doc
from service.family import Endpoint, RequestParams
from service.serving import FamilyService, known_query_only

COMMON = frozenset(RequestParams.model_fields)


def by_endpoint(services: list[FamilyService]) -> dict[str, list[FamilyService]]:
    """Services grouped by path, refusing two different endpoint descriptions at one path."""
    groups: dict[str, list[FamilyService]] = {}
    for svc in services:
        group = groups.setdefault(svc.endpoint.path, [])
        if group and group[0].endpoint is not svc.endpoint:
            raise ValueError(f"{svc.name} ({svc.family.family}) and {group[0].name} ({group[0].family.family}) "
                             f"describe route {svc.endpoint.path} differently: families at one path must share "
                             "its Endpoint")
        group.append(svc)
    return groups


def select(services: list[FamilyService], endpoint: Endpoint, params: RequestParams) -> FamilyService:
    """The model a request reaches: the one it names, else the first that ``selects`` it;
    then refuse parameters the chosen family does not use (they would be ignored)."""
    if params.model is not None:
        svc = next((s for s in services if s.name == params.model), None)
        if svc is None:
            raise ApiError(422, f"model={params.model!r} is not served at {endpoint.path}",
                           ", ".join(s.name for s in services) or None)
        if not svc.family.selects(params):
            wanted = {k: getattr(params, k) for k in endpoint.selects_by}
            raise ApiError(422, f"model {svc.name} answers {_pairs(svc.family.selection())}, not {_pairs(wanted)}")
    else:
        svc = next((s for s in services if s.family.selects(params)), None)
        if svc is None:
            if not services:
                raise ApiError(503, f"no model is configured for {endpoint.path}")
            wanted = {k: getattr(params, k) for k in endpoint.selects_by}
            raise ApiError(422, f"no model here answers {_pairs(wanted)}",
                           "; ".join(f"{_pairs(s.family.selection())} ({s.name})" for s in services))
    foreign = params.model_fields_set - COMMON - svc.family.uses - set(endpoint.selects_by)
    if foreign:
        users = [s.name for s in services if foreign & s.family.uses]
        raise ApiError(422, f"{', '.join(sorted(foreign))} {'does' if len(foreign) == 1 else 'do'} not apply to "
                            f"{svc.name} ({svc.family.family})",
                       f"for {svc.name}: {', '.join(sorted(COMMON | svc.family.uses))}" +
                       (f"; {', '.join(sorted(foreign))} {'is' if len(foreign) == 1 else 'are'} for "
                        f"{', '.join(users)}" if users else ""))
    return svc


def parse_query(endpoint: Endpoint, query: Mapping[str, list[str]]) -> RequestParams | None:
    """The endpoint's parameters from a raw query string (the quick shed, before routing);
    None when they do not validate (the route will say what is wrong)."""
    try:
        return endpoint.params.model_validate({k: v[0] for k, v in query.items()})
    except ValidationError:
        return None


def router(services: list[FamilyService]) -> APIRouter:
    """One POST route per endpoint of the given services."""
    r = APIRouter(dependencies=[Depends(known_query_only)])
    for path, group in by_endpoint(services).items():
        endpoint = group[0].endpoint
        r.add_api_route(path, _route(endpoint, group), methods=["POST"], summary=endpoint.summary,
                        response_class=Response, openapi_extra=endpoint.request_body,
                        responses={**endpoint.responses, **doc(400, 401, 406, 413, 415, 422, 429, 503, 504)},
                        description=_description(group))
    return r


def _route(endpoint: Endpoint, group: list[FamilyService]):
    async def route(request: Request, params: BaseModel) -> Response:
        svc = select(group, endpoint, params)  # type: ignore[arg-type]
        return await svc.handle(request, params)  # type: ignore[arg-type]

    # FastAPI reads parameters from the signature: the endpoint's model, as query parameters
    route.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
        inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          annotation=Annotated[endpoint.params, Query()])])
    route.__name__ = endpoint.path.strip("/").replace("/", "_") or "root"
    return route


def _description(group: list[FamilyService]) -> str:
    lines = ["Models served here (GET /v1/models lists their rungs):", ""]
    for s in group:
        f = s.family
        uses = ", ".join(sorted(f.uses)) or "none"
        lines.append(f"* `{s.name}` ({f.family}; its own parameters: {uses}; FLOPs: {f.flops_convention})")
    return "\n".join(lines)


def _pairs(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "this request"
