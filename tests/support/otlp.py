"""An OTLP/HTTP trace receiver on a loopback port: what the service's exporters send to
`POST /v1/traces`, decoded (protobuf, gzip or not) into flat spans a test can query, and
kept as received for the secret scan."""

from __future__ import annotations

import gzip
import http.server
import threading
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from humanconnect.cli.procs import free_port


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


@dataclass(frozen=True)
class Span:
    """One exported span, its ids in hex."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    service: str
    scope: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    links: list[tuple[str, str]]
    status_message: str


@dataclass
class OtlpReceiver:
    """Collects every span sent to `url` (its OTEL_EXPORTER_OTLP_ENDPOINT)."""

    port: int = field(default_factory=free_port)
    spans: list[Span] = field(default_factory=list)
    #: Each export request's body as received (decompressed): what the secret scan reads.
    bodies: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                encoding = (self.headers.get("content-encoding") or "").lower()
                if encoding == "gzip":
                    raw = gzip.decompress(raw)
                elif encoding == "deflate":
                    raw = zlib.decompress(raw)
                if self.path.rstrip("/") != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                owner._add(raw)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _add(self, raw: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(raw)
        spans = []
        for rs in request.resource_spans:
            service = str(_attributes(rs.resource.attributes).get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        Span(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            service=service,
                            scope=ss.scope.name,
                            attributes=_attributes(s.attributes),
                            events=[(e.name, _attributes(e.attributes)) for e in s.events],
                            links=[(lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links],
                            status_message=s.status.message,
                        )
                    )
        with self._lock:
            self.bodies.append(raw)
            self.spans.extend(spans)

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def traces(self) -> dict[str, list[Span]]:
        """Every span received so far, by trace id."""
        out: dict[str, list[Span]] = defaultdict(list)
        for span in self.snapshot():
            out[span.trace_id].append(span)
        return dict(out)

    def received(self) -> bytes:
        """Everything received, as one blob for a scan."""
        with self._lock:
            return b"\n".join(self.bodies)
