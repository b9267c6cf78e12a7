"""The REST routes of DESIGN.md: jobs, their messages, workflows, health and metrics.

Every route but ``/health`` authenticates the bearer token first, and a job of another user is
answered exactly like a missing one (404 ``Job not found: ID``). Query strings are validated by
quart-schema models (422 on bad values); bodies are parsed here so a broken JSON body is a 400
and a well-formed but wrong one a 422 naming the field. The pydantic models and the OpenAPI
provider here describe the API in ``/openapi.json``; responses are written directly (message
pages are spliced from the log's ready-made JSON text, never decoded). This module must not
import apsw or any execution backend.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Final, NoReturn
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field
from quart import Response, abort, g, request
from quart_schema import OpenAPIProvider, document_request, document_response, security_scheme
from quart_schema import validate_querystring as query

from nodejob.executions import ExecutionUnavailable
from nodejob.manager import CancelResult, WorkflowNotFound
from nodejob.metrics import CONTENT_TYPE, make_registry, render
from nodejob.protocol import (
    MAX_FRAME_BYTES,
    ExecutionStrategy,
    JobStatus,
    MessageType,
    ProcessingContext,
    ProtocolError,
    RunJobRequest,
    dumps,
    iso,
)
from nodejob.server import ws
from nodejob.server.auth import authenticate, bearer_token
from nodejob.server.query import QueryInt, QueryModel, QueryStr
from nodejob.workflow import GraphError

if TYPE_CHECKING:
    from collections.abc import Callable

    from pydantic.config import JsonDict
    from quart_trio import QuartTrio

    from nodejob.server.app import ServerState
    from nodejob.store import JobRecord, User

PUBLIC_ENDPOINTS: Final = frozenset({"health", "openapi"})
QUERY_TOKEN_ENDPOINTS: Final = frozenset({"job_events"})
"""EventSource cannot send headers: these routes also take ``?token=``."""
MAX_JOBS_PAGE: Final = 1000
MAX_MESSAGES_PAGE: Final = 10_000
MAX_ID_CHARS: Final = 256
"""Longest workflow id a client may save."""
_CONTROLS: Final = r"\x00-\x1f\x7f-\x9f"
"""C0 and C1 control characters (a regex class body): never part of an id a client meant."""
_CONTROL: Final = re.compile(f"[{_CONTROLS}]")


# -- documentation models (validation of queries; documentation of bodies) ---------------


class Detail(BaseModel):
    """An error."""

    detail: str


class Job(BaseModel):
    """A job object (timestamps ISO 8601 UTC with Z)."""

    id: str
    user_id: str
    job_type: str
    status: JobStatus
    workflow_id: str | None
    execution_strategy: str
    params: dict[str, Any]
    created_at: str | None = None
    started_at: str | None
    finished_at: str | None
    error: str | None
    result: dict[str, Any] | None = None
    cost: float | None
    last_seq: int


class RunningJob(BaseModel):
    job_id: str
    status: JobStatus
    workflow_id: str | None
    created_at: str | None
    is_running: bool
    is_completed: bool


class GraphNode(BaseModel):
    """A node: ``data`` holds its constant inputs."""

    id: str
    type: str = Field(examples=["nodejob.Constant"])
    data: dict[str, Any] | None = None


class GraphEdge(BaseModel):
    """Feeds one node's output (``sourceHandle``, default ``output``) into another's input."""

    source: str
    sourceHandle: str | None = "output"
    target: str
    targetHandle: str


class Graph(BaseModel):
    """A workflow graph. Node types, handles, required inputs and cycles are checked when a
    job starts (422 naming the node and the problem)."""

    nodes: list[GraphNode] | None = None
    edges: list[GraphEdge] | None = None


_HELLO: Final[JsonDict] = {
    "nodes": [
        {"id": "a", "type": "nodejob.Constant", "data": {"value": 2}},
        {"id": "b", "type": "nodejob.Add", "data": {"b": 3}},
        {"id": "out", "type": "nodejob.Output", "data": {"name": "sum"}},
    ],
    "edges": [
        {"source": "a", "sourceHandle": "output", "target": "b", "targetHandle": "a"},
        {"source": "b", "sourceHandle": "output", "target": "out", "targetHandle": "value"},
    ],
}


class RunJob(BaseModel):
    """``run_job`` data: a graph, or the workflow_id of a saved workflow."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["graph"], "properties": {"graph": {"type": "object"}}},
                {"required": ["workflow_id"], "properties": {"workflow_id": {"type": "string"}}},
            ],
            "examples": [{"graph": _HELLO}],
        }
    )

    # As on the WebSocket, null means "not given" for every optional field; the schema says so.
    graph: Graph | None = None
    workflow_id: str | None = None
    params: dict[str, Any] | None = {}
    job_type: str | None = "workflow"
    execution_strategy: ExecutionStrategy | None = None
    timeout_seconds: float | None = Field(None, gt=0)
    resources: dict[str, Any] | None = {}


class Cancelled(BaseModel):
    message: str
    job_id: str


class MessagePage(BaseModel):
    """Messages after ``after_seq``; ``last_seq`` is the next ``after_seq``."""

    messages: list[dict[str, Any]]
    last_seq: int
    has_more: bool


class WorkflowIn(BaseModel):
    """A workflow to save; ``name`` defaults to its id."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "hello", "graph": _HELLO}]})

    name: str | None = None
    graph: dict[str, Any] = Field(
        description="saved as given (see Graph); checked when a job runs it",
    )


class Workflow(BaseModel):
    id: str
    name: str
    graph: dict[str, Any]
    updated_at: Any = None


class Health(BaseModel):
    status: str


class JobsQuery(QueryModel):
    workflow_id: QueryStr = None
    limit: QueryInt = Field(100, ge=1, le=MAX_JOBS_PAGE)
    start_key: QueryStr = Field(None, description="opaque; from the Link rel=next header")


class MessagesQuery(QueryModel):
    after_seq: QueryInt = Field(0, ge=0)
    limit: QueryInt = Field(1000, ge=1, le=MAX_MESSAGES_PAGE)


class OpenAPI(OpenAPIProvider):
    """quart-schema's description plus what it cannot see: ``/ws``, the shared error
    responses, and the non-JSON bodies of ``/metrics`` and the event stream."""

    def operation_id(self, method: str, path: str, func: Callable[..., Any]) -> str:
        return func.__name__

    def schema(self) -> dict[str, Any]:
        schema = super().schema()
        paths = schema["paths"]
        for item in paths.values():
            for op in item.values():  # quart-schema keys responses by int; JSON wants strings
                op["responses"] = {str(code): r for code, r in op.get("responses", {}).items()}
        paths["/ws"] = {"get": ws.OPENAPI_OPERATION}
        paths["/openapi.json"] = {"get": _operation("get_openapi", "This OpenAPI 3 description.")}
        paths["/metrics"]["get"]["responses"]["200"] = _text("Prometheus text format", "text/plain")
        events = paths["/api/jobs/{job_id}/events"]["get"]["responses"]
        events["200"] = _text(
            "id: SEQ / event: TYPE / data: JSON, per message", "text/event-stream"
        )
        events["200"]["content"]["text/event-stream"]["schema"] = SSE_EVENT
        job_events = paths["/api/jobs/{job_id}/events"]["get"]
        job_events.setdefault("parameters", []).append(LAST_EVENT_ID)
        schema["components"]["schemas"]["Detail"] = Detail.model_json_schema()
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/Detail"}}}
        string = {"schema": {"type": "string"}}
        jobs = paths["/api/jobs/"]
        jobs["get"]["responses"]["200"]["headers"] = {
            "Link": {"description": 'the next page: <URL>; rel="next"', **string}
        }
        jobs["post"]["responses"]["201"]["headers"] = {
            "Location": {"description": "the new job's path", **string}
        }
        jobs["post"]["responses"]["201"]["links"] = {
            name: {"operationId": operation, "parameters": {"job_id": "$response.body#/id"}}
            for name, operation in _JOB_LINKS.items()
        }
        paths["/api/workflows/{workflow_id}"]["put"]["responses"]["200"]["links"] = {
            "GetWorkflow": {
                "operationId": "get_workflow",
                "parameters": {"workflow_id": "$response.body#/id"},
            }
        }
        for path, item in paths.items():
            if path == "/ws":
                continue
            for method, op in item.items():
                codes = op["responses"]
                for parameter in op.get("parameters", ()):
                    if parameter["in"] == "path":  # "" would name another route
                        parameter["schema"]["minLength"] = 1
                    if parameter["name"] == "workflow_id" and parameter["in"] == "path":
                        parameter["schema"]["maxLength"] = MAX_ID_CHARS
                        if method == "put":
                            parameter["schema"]["pattern"] = f"^[^{_CONTROLS}]*$"
                if "requestBody" in op:
                    op["requestBody"]["required"] = True
                if op.get("security") != []:
                    codes.setdefault("401", {"description": "missing or invalid token"})
                    codes["401"]["headers"] = {"WWW-Authenticate": string}
                if "{job_id}" in path or (method == "get" and "{" in path):
                    codes.setdefault("404", {"description": "no such job or workflow of yours"})
                if "{workflow_id}" in path and method == "put":
                    codes.setdefault("422", {"description": "an id no one could mean"})
                if "requestBody" in op:
                    codes.setdefault("400", {"description": "the body is not JSON"})
                    codes.setdefault("413", {"description": f"body over {MAX_FRAME_BYTES} bytes"})
                    codes.setdefault("422", {"description": "the body has a wrong field"})
                if method in ("post", "put"):
                    codes.setdefault(
                        "503",
                        {
                            "description": "the database refuses writes for now (locked, disk"
                            " full); try again after Retry-After seconds",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                        },
                    )
                if any(p["in"] == "query" for p in op.get("parameters", ())):
                    codes.setdefault("422", {"description": "invalid query parameter"})
                for code, response in codes.items():
                    if code.startswith(("4", "5")):
                        response.setdefault("content", error)
                    if response.get("description", "").startswith("Built-in mutable sequence"):
                        response["description"] = "A JSON array."
        return schema


_JOB_LINKS: Final = {
    "GetJob": "get_job",
    "CancelJob": "cancel_job",
    "JobMessages": "job_messages",
    "JobEvents": "job_events",
}

SSE_EVENT: Final = {
    "description": "One event per message (OpenAPI 3.1: this schema describes each event).",
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the message's seq"},
        "event": {"type": "string", "enum": [t.value for t in MessageType]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "the message, exactly as over the WebSocket",
        },
    },
}

LAST_EVENT_ID: Final = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "resume after this seq (EventSource sends it when it reconnects)",
    "schema": {"type": "string", "pattern": "^[0-9]*$"},
}


def _operation(operation_id: str, summary: str) -> dict[str, Any]:
    ok = {"200": {"description": "OpenAPI document"}}
    return {"summary": summary, "operationId": operation_id, "security": [], "responses": ok}


def _text(description: str, media_type: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


# -- helpers -------------------------------------------------------------------------------


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status=status, content_type="application/json", headers=headers)


def not_found_job(job_id: str) -> NoReturn:
    abort(404, f"Job not found: {job_id}")


async def read_json_body() -> Any:
    """The request body decoded as JSON: 400 if it is not JSON, 413 if it is too big."""
    raw = await request.get_data(cache=False, as_text=False)
    if not raw.strip():
        abort(400, "request body must be JSON")
    try:
        # Python's decoder takes NaN and Infinity, which are not JSON: echoed back in a job
        # object or a stream message, they would break every standard client's parser.
        return json.loads(raw, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        abort(400, f"invalid JSON: {exc}")


def _not_json(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def check_id(name: str, value: str) -> None:
    """422 for an id no one could have meant: too long, or holding control characters."""
    if len(value) > MAX_ID_CHARS:
        abort(422, f"{name}: at most {MAX_ID_CHARS} characters")
    if _CONTROL.search(value):
        abort(422, f"{name}: must not contain control characters")


def register(app: QuartTrio, state: ServerState) -> None:
    """Add the REST routes to ``app``."""
    manager = state.manager
    store = manager.store
    registry = make_registry(
        [("", manager.stats), ("log_", manager.log.stats), ("", state.stats.snapshot)]
    )

    @app.before_request
    async def require_token() -> None:
        """Authenticate before anything else (query validation included): 401 comes first.

        Unrouted requests (endpoint None) go on to their 404/405 without a token.
        """
        endpoint = request.endpoint
        if endpoint is None or endpoint in PUBLIC_ENDPOINTS:
            return
        token = bearer_token(request.headers.get("Authorization"))
        if token is None and endpoint in QUERY_TOKEN_ENDPOINTS:
            token = request.args.get("token")
        g.user = await authenticate(store, token)
        g.token = token or ""

    def caller() -> tuple[User, str]:
        return g.user, g.token

    async def owned_job(user: User, job_id: str) -> JobRecord:
        job = await manager.get_job(job_id)
        if job is None or job.user_id != user.id:
            not_found_job(job_id)
        return job

    @app.get("/api/jobs/")
    @query(JobsQuery)
    @document_response(list[Job])
    @document_response(Detail, 401)
    async def list_jobs(query_args: JobsQuery) -> Response:
        """Your jobs, newest first.

        When more remain, a ``Link: <URL>; rel="next"`` header gives the next page.
        """
        user, _ = caller()
        try:
            jobs, next_key = await manager.list_jobs(
                user.id,
                workflow_id=query_args.workflow_id,
                limit=query_args.limit,
                start_key=query_args.start_key,
            )
        except ValueError:
            abort(422, "start_key: invalid")
        headers = {}
        if next_key is not None:
            params = {"limit": str(query_args.limit), "start_key": next_key}
            if query_args.workflow_id is not None:
                params["workflow_id"] = query_args.workflow_id
            headers["Link"] = f'<{request.base_url}?{urlencode(params)}>; rel="next"'
        return json_response([job.to_api() for job in jobs], headers=headers)

    @app.get("/api/jobs/running/all")
    @document_response(list[RunningJob])
    async def running_jobs() -> Response:
        """Every unfinished job of yours (``starting`` or ``running``)."""
        user, _ = caller()
        jobs = await store.unfinished_jobs(user.id)
        return json_response(
            [
                {
                    "job_id": job.id,
                    "status": JobStatus(job.status).value,
                    "workflow_id": job.workflow_id,
                    "created_at": iso(job.created_at),
                    "is_running": job.status == JobStatus.RUNNING,
                    "is_completed": JobStatus(job.status).is_terminal,
                }
                for job in jobs
            ]
        )

    @app.get("/api/jobs/<job_id>")
    @document_response(Job)
    @document_response(Detail, 404)
    async def get_job(job_id: str) -> Response:
        """One job."""
        user, _ = caller()
        return json_response((await owned_job(user, job_id)).to_api())

    @app.post("/api/jobs/")
    @document_request(RunJob)
    @document_response(Job, 201)
    @document_response(Detail, 422)
    @document_response(Detail, 404)
    async def start_job() -> Response:
        """Start a job (the ``run_job`` data of the WebSocket command).

        The identity is the token's; a ``user_id`` in the body is ignored. An invalid graph is
        a 422 naming the node and the problem; an unknown ``workflow_id`` a 404.
        """
        user, token = caller()
        data = await read_json_body()
        try:
            run = RunJobRequest.from_data(data)
        except ProtocolError as exc:
            abort(422, str(exc))
        ws.refuse_while_store_fails(manager)
        run.user_id, run.auth_token = user.id, token
        context = ProcessingContext(user_id=user.id, auth_token=token, workflow_id=run.workflow_id)
        try:
            job = await manager.start_job(run, context)
        except (GraphError, ExecutionUnavailable) as exc:
            abort(422, str(exc))
        except WorkflowNotFound as exc:
            abort(404, _lookup_reason(exc, f"Workflow not found: {run.workflow_id}"))
        job = await manager.get_job(job.id) or job  # the row as committed (last_seq >= 1)
        return json_response(job.to_api(), 201, {"Location": f"/api/jobs/{job.id}"})

    @app.post("/api/jobs/<job_id>/cancel")
    @document_response(Cancelled)
    @document_response(Detail, 409)
    async def cancel_job(job_id: str) -> Response:
        """Cancel a job; 409 if it already finished."""
        user, _ = caller()
        await owned_job(user, job_id)
        result = await manager.cancel_job(job_id)
        if result is CancelResult.ALREADY_FINISHED:
            abort(409, f"Job already finished: {job_id}")
        if result is CancelResult.NOT_FOUND:
            not_found_job(job_id)
        return json_response({"message": "Job cancelled successfully", "job_id": job_id})

    @app.get("/api/jobs/<job_id>/messages")
    @query(MessagesQuery)
    @document_response(MessagePage)
    async def job_messages(job_id: str, query_args: MessagesQuery) -> Response:
        """A page of a job's messages with seq > ``after_seq`` (a gap first if some are gone)."""
        user, _ = caller()
        await owned_job(user, job_id)
        after_seq = query_args.after_seq
        entries, has_more = await manager.log.read_page(job_id, after_seq, query_args.limit)
        last_seq = entries[-1].seq if entries else after_seq
        body = (
            '{"messages":['
            + ",".join([entry.text for entry in entries])
            + f'],"last_seq":{last_seq},"has_more":{"true" if has_more else "false"}}}'
        )
        return Response(body, content_type="application/json")

    @app.put("/api/workflows/<workflow_id>")
    @document_request(WorkflowIn)
    @document_response(Workflow)
    async def put_workflow(workflow_id: str) -> Response:
        """Save (create or replace) a workflow of yours."""
        user, _ = caller()
        check_id("workflow_id", workflow_id)
        data = await read_json_body()
        if not isinstance(data, dict):
            abort(422, "body must be an object")
        name = data.get("name")
        if name is None:
            name = workflow_id
        graph = data.get("graph")
        if not isinstance(name, str):
            abort(422, "name must be a string")
        if not isinstance(graph, dict):
            abort(422, "missing field: graph" if graph is None else "graph must be an object")
        return json_response(await store.put_workflow(user.id, workflow_id, name, graph))

    @app.get("/api/workflows/<workflow_id>")
    @document_response(Workflow)
    @document_response(Detail, 404)
    async def get_workflow(workflow_id: str) -> Response:
        """One saved workflow of yours."""
        user, _ = caller()
        workflow = await store.get_workflow(user.id, workflow_id)
        if workflow is None:
            abort(404, f"Workflow not found: {workflow_id}")
        return json_response(workflow)

    @app.get("/api/workflows/")
    @document_response(list[Workflow])
    async def list_workflows() -> Response:
        """Your saved workflows."""
        user, _ = caller()
        return json_response(await store.list_workflows(user.id))

    @app.get("/health")
    @security_scheme([])
    @document_response(Health)
    async def health() -> Response:
        """Liveness: ``{"status": "ok"}``; needs no token."""
        return json_response({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        return Response(render(registry), content_type=CONTENT_TYPE)


def _lookup_reason(exc: LookupError, default: str) -> str:
    text = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
    return text or default
