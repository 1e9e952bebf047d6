"""The Protobuf event message, `clickvec.v1.ClickEvent`, built at run time from a
descriptor written here (no protoc, no generated module). schemas/event.proto is the
same message as text; tests check that the two agree field by field."""

from __future__ import annotations

import functools
from typing import Any

# (name, number, type, proto3 optional); types are FieldDescriptorProto.Type names.
EVENT_FIELDS: tuple[tuple[str, int, str, bool], ...] = (
    ("user_id", 1, "TYPE_STRING", False),
    ("item_id", 2, "TYPE_STRING", False),
    ("event_type", 3, "TYPE_STRING", False),
    ("ts", 4, "TYPE_INT64", False),
    ("category", 5, "TYPE_STRING", True),
    ("amount", 6, "TYPE_DOUBLE", True),
    ("session_id", 7, "TYPE_STRING", True),
)
PACKAGE = "clickvec.v1"
MESSAGE = "ClickEvent"
FILE_NAME = "clickvec/v1/event.proto"


def file_descriptor_proto() -> Any:
    """event.proto as a FileDescriptorProto."""
    from google.protobuf import descriptor_pb2

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name=FILE_NAME, package=PACKAGE, syntax="proto3")
    msg = fdp.message_type.add(name=MESSAGE)
    for name, number, typ, optional in EVENT_FIELDS:
        f = msg.field.add(name=name, number=number, type=getattr(F, typ), label=F.LABEL_OPTIONAL, json_name=name)
        if optional:  # proto3 `optional`: a synthetic one-field oneof gives it presence
            f.proto3_optional = True
            f.oneof_index = len(msg.oneof_decl)
            msg.oneof_decl.add(name="_" + name)
    return fdp


@functools.cache
def event_message_class() -> Any:
    """The generated message class of `clickvec.v1.ClickEvent`, in a pool of its own."""
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_descriptor_proto())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{MESSAGE}"))


_REQUIRED = tuple(name for name, _, _, optional in EVENT_FIELDS if not optional)
_OPTIONAL = tuple(name for name, _, _, optional in EVENT_FIELDS if optional)


def event_fields(m: Any) -> dict[str, Any]:
    """A decoded message as the fields `clickvec.contract.events.event_of` checks. Fields
    the message does not set are absent (proto3 has no "missing" for the others: an unset
    id reads as "" and is refused as empty). Unknown fields were skipped by the parser."""
    d = {name: getattr(m, name) for name in _REQUIRED}
    for name in _OPTIONAL:
        if m.HasField(name):
            d[name] = getattr(m, name)
    return d
