"""OTLP/HTTP wire handling: content types, gzip with a size cap, protobuf and JSON decoding.

Everything here is pure (bytes in, messages out) and raises :class:`OtlpError` with the HTTP
status the receiver must answer: 400 for bytes that are not an OTLP export request, 413 for
too many bytes (before or after gunzip), 415 for an encoding we do not speak.

The JSON encoding is protobuf's JSON mapping with two OTLP deviations (OTLP spec, "JSON
Protobuf Encoding"): trace and span ids are hex, not base64, and enums are integers. Ids are
rewritten to base64 before protobuf's ``json_format`` parses the document, so both encodings
end in the same message types and one extraction path.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections.abc import Iterable
from typing import Any, Literal, TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

__all__ = [
    "JSON",
    "PROTOBUF",
    "Encoding",
    "OtlpError",
    "any_value",
    "attributes",
    "decode_metrics",
    "decode_traces",
    "encode_response",
    "media_type",
]

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
Encoding = Literal["application/x-protobuf", "application/json"]

M = TypeVar("M", bound=Message)


class OtlpError(Exception):
    """A request the receiver refuses; ``reason`` is the label of the rejection counter."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        # All three in args: the error must survive pickling back from an ingest process.
        super().__init__(status, message, reason)
        self.status = status
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        return self.message


def media_type(content_type: str | None) -> Encoding:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == PROTOBUF:
        return "application/x-protobuf"
    if media == JSON:
        return "application/json"
    raise OtlpError(
        415,
        f"unsupported content type {media or '(none)'!r}: send {PROTOBUF} or {JSON}",
        "content_type",
    )


def decompress(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """The body without its content encoding, refusing to inflate past ``max_bytes``.

    zlib stops at ``max_length`` output bytes, so a gzip bomb costs at most ``max_bytes`` of
    memory before it is refused, however much it would expand.
    """
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise OtlpError(415, f"unsupported content encoding {encoding!r}: use gzip", "encoding")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing only
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise OtlpError(400, f"body is not valid gzip: {exc}", "gzip") from None
    if len(data) > max_bytes:
        raise OtlpError(
            413, f"body inflates to more than {max_bytes} bytes", "too_large_decompressed"
        )
    if not inflater.eof:
        raise OtlpError(400, "gzip stream is truncated", "gzip")
    if inflater.unused_data:
        raise OtlpError(400, "unexpected bytes after the gzip stream", "gzip")
    return data


def decode_traces(body: bytes, encoding: Encoding) -> ExportTraceServiceRequest:
    request = _decode(body, encoding, ExportTraceServiceRequest)
    if body and not request.resource_spans and request.ByteSize():
        raise OtlpError(400, "not an OTLP ExportTraceServiceRequest", "malformed")
    return request


def decode_metrics(body: bytes, encoding: Encoding) -> ExportMetricsServiceRequest:
    request = _decode(body, encoding, ExportMetricsServiceRequest)
    if body and not request.resource_metrics and request.ByteSize():
        raise OtlpError(400, "not an OTLP ExportMetricsServiceRequest", "malformed")
    return request


def encode_response(
    encoding: Encoding, signal: Literal["traces", "metrics"], rejected: int = 0, message: str = ""
) -> bytes:
    """The export response in the request's encoding, with OTLP's partial success if any."""
    response: ExportTraceServiceResponse | ExportMetricsServiceResponse
    if signal == "traces":
        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = message
    else:
        response = ExportMetricsServiceResponse()
        if rejected:
            response.partial_success.rejected_data_points = rejected
            response.partial_success.error_message = message
    if encoding == PROTOBUF:
        encoded: bytes = response.SerializeToString()
        return encoded
    return str(json_format.MessageToJson(response, indent=None)).encode()


def _decode(body: bytes, encoding: Encoding, message_type: type[M]) -> M:
    if encoding == PROTOBUF:
        try:
            decoded: M = message_type.FromString(body)
            return decoded
        except DecodeError as exc:
            raise OtlpError(
                400, f"body is not a valid protobuf message: {exc}", "malformed"
            ) from None
    try:
        document = json.loads(body) if body else {}
    except (ValueError, RecursionError) as exc:
        raise OtlpError(400, f"body is not valid JSON: {exc}", "malformed") from None
    if not isinstance(document, dict):
        raise OtlpError(400, "body must be a JSON object", "malformed")
    _hex_ids_to_base64(document)
    message: M = message_type()
    try:
        # OTLP: receivers must ignore fields they do not know (newer senders add some).
        json_format.ParseDict(document, message, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise OtlpError(400, f"body is not an OTLP JSON request: {exc}", "malformed") from None
    return message


_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


def _hex_ids_to_base64(node: Any) -> None:
    """Rewrite OTLP's hex ids to the base64 protobuf's JSON mapping expects, in place."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in _ID_KEYS and isinstance(value, str):
                    item[key] = _hex_to_base64(key, value)
                elif isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, dict | list))


def _hex_to_base64(key: str, value: str) -> str:
    try:
        return base64.b64encode(bytes.fromhex(value)).decode()
    except ValueError:
        raise OtlpError(400, f"{key} must be hex, got {value[:40]!r}", "malformed") from None


# ---------------------------------------------------------------------------------------------
# Attribute values


def any_value(value: AnyValue) -> Any:
    """An OTLP AnyValue as plain JSON-ready Python (bytes as hex, nested values recursively)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return binascii.hexlify(value.bytes_value).decode()
    return getattr(value, kind)


def attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}
