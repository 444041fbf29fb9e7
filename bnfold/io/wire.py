"""The protobuf wire format as far as bnfold reads and writes it itself.

A field is a varint key (field number << 3 | wire type) then its value: a varint (type 0),
8 bytes (1), a varint length and that many bytes (2), or 4 bytes (5). Groups (3, 4) are
obsolete and absent from ONNX; a file that has them is left to protobuf's own parser. A
message field that occurs several times is merged by every parser (protobuf's encoding spec:
"Last One Wins" for scalars, merge for messages), so a GraphProto can be written as a shell
and then one chunk per initializer.
"""

from __future__ import annotations

# field numbers in onnx.proto
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_RAW_DATA = 9
TENSOR_EXTERNAL_DATA = 13
TENSOR_DATA_LOCATION = 14

LEFT_IN_FILE = 1024  # the light parse leaves raw data of at least this many bytes in the file


class NotPlain(Exception):
    """The wire format holds something the light parse does not handle: protobuf parses it."""


def _varint_at(data, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise NotPlain
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data, start: int, end: int):
    """(field number, wire type, field start, value start, field end) for each field."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint_at(data, pos, end)
        number, wire = key >> 3, key & 7
        value_start = pos
        if wire == 0:
            _, pos = _varint_at(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, value_start = _varint_at(data, pos, end)
            pos = value_start + length
        else:
            raise NotPlain
        if pos > end:
            raise NotPlain
        yield number, wire, field_start, value_start, pos


def light_model(data) -> tuple[bytes, dict[int, tuple[int, int]]] | None:
    """The serialized model without the raw data of its large main-graph initializers, and
    where each one's bytes lie in `data`: initializer position → (offset, length). None when
    the file is not plain wire format (protobuf then parses it, and says what is wrong)."""
    try:
        out, left, position = bytearray(), {}, 0
        for number, wire, field_start, start, end in _fields(data, 0, len(data)):
            if number != MODEL_GRAPH or wire != 2:
                out += data[field_start:end]
                continue
            graph = bytearray()
            for inner, inner_wire, inner_start, value_start, value_end in _fields(data, start, end):
                stub = None
                if inner == GRAPH_INITIALIZER and inner_wire == 2:
                    found = _stub(data, value_start, value_end)
                    if found is not None:
                        stub, left[position] = found
                    position += 1
                if stub is None:
                    graph += data[inner_start:value_end]
                else:
                    graph += field_header(GRAPH_INITIALIZER, len(stub)) + stub
            out += field_header(MODEL_GRAPH, len(graph)) + graph
        return bytes(out), left
    except NotPlain:
        return None


def _stub(data, start: int, end: int) -> tuple[bytes, tuple[int, int]] | None:
    """A TensorProto's bytes without its raw_data, and where that lies; or None to keep the
    tensor as it is (small, already external, or unusual)."""
    rest, raw = bytearray(), None
    for number, wire, field_start, value_start, value_end in _fields(data, start, end):
        if number == TENSOR_RAW_DATA and wire == 2 and raw is None:
            raw = (value_start, value_end - value_start)
        elif number in (TENSOR_RAW_DATA, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION):
            return None
        else:
            rest += data[field_start:value_end]
    if raw is None or raw[1] < LEFT_IN_FILE:
        return None
    return bytes(rest), raw


def is_repeated(field) -> bool:
    # protobuf 5.29+ has is_repeated; `label` is gone in protobuf 7
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_header(number: int, length: int) -> bytes:
    """The key and length of a length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(length)


def shell(message, skip: set[str]):
    """A copy of `message` without the fields in `skip`, made field by field so that the
    skipped ones (a graph's initializers, a tensor's data) are never touched or copied."""
    copy = type(message)()
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if name in skip:
            continue
        if is_repeated(field):
            if len(getattr(message, name)):
                getattr(copy, name).extend(getattr(message, name))
        elif message.HasField(name):
            if field.type == field.TYPE_MESSAGE:
                getattr(copy, name).CopyFrom(getattr(message, name))
            else:
                setattr(copy, name, getattr(message, name))
    return copy
