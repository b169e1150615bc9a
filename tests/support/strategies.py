"""Hypothesis strategies for hostile protobuf messages: any message built from its descriptor with extreme
values (int64 limits, NaN, unknown enum numbers, odd strings, random bytes, inconsistent tensors), and valid
requests with a few of their fields replaced by such values."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from noiserater.core.v1 import tensor_pb2

F = FieldDescriptor
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EDGE_INTS = [0, 1, 2, 4, 64, 65, 100, -1, -2, 2**31 - 1, 2**31, 2**32, 2**62, INT64_MAX, INT64_MIN]
ODD_STRINGS = ["", "digits", "digits\n", "²", "٣", "../digits", "digits/1", ".", "..", "-1", "0", "1", "01",
               "9" * 30, "9" * 5000, "n" * 5000, "FP32", "FP64", "INT32", "INT64", "BYTES", "x0", "t", "eps", "score",
               "dataset", "\x00", "é", "default"]

# Shapes that are known trouble for decoders: byte sizes beyond int64 with and without a zero-size axis, more
# dimensions than numpy allows, negative and empty ones.
ODD_SHAPES = [[0, 2**62, 2**62], [2**32, 2**32, 2**32], [1] * 65, [0] * 70, [INT64_MAX], [-1], [], [0], [2, -64],
              [2**31, 64], [1, 2**62]]
# Versions as KServe sends them (strings): non-ASCII digits, beyond int64, beyond Python's int() digit limit.
ODD_VERSIONS = ["", "0", "1", "01", "-1", " 1", "1.0", "²", "٣", "9" * 19, "9" * 5000, "1\n"]

edge_ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-3, 70))
odd_text = st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=40))


def _int_strategy(bits: int, signed: bool) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return st.one_of(edge_ints.filter(lambda v: low <= v <= high), st.integers(low, high))


SCALARS: dict[int, st.SearchStrategy] = {
    F.TYPE_INT64: _int_strategy(64, True), F.TYPE_SINT64: _int_strategy(64, True),
    F.TYPE_SFIXED64: _int_strategy(64, True), F.TYPE_UINT64: _int_strategy(64, False),
    F.TYPE_FIXED64: _int_strategy(64, False), F.TYPE_INT32: _int_strategy(32, True),
    F.TYPE_SINT32: _int_strategy(32, True), F.TYPE_SFIXED32: _int_strategy(32, True),
    F.TYPE_UINT32: _int_strategy(32, False), F.TYPE_FIXED32: _int_strategy(32, False),
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    F.TYPE_FLOAT: st.floats(allow_nan=True, allow_infinity=True, width=32),
    F.TYPE_STRING: odd_text,
    F.TYPE_BYTES: st.binary(max_size=1024),
}


@st.composite
def tensors(draw) -> tensor_pb2.Tensor:
    """A noiserater.v1.Tensor: small and consistent (data matches dtype and shape), or anything at all."""
    if draw(st.booleans()):
        dtype = draw(st.sampled_from([1, 2, 3, 4]))
        shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 64]), min_size=0, max_size=4))
        size = int(np.prod(shape)) if shape else 1
        itemsize = {1: 4, 2: 2, 3: 8, 4: 4}[dtype]
        if size * itemsize > 1 << 16:
            shape, size = [2, 64], 128
        if dtype in (1, 2):
            value = draw(st.sampled_from([0.0, 1.0, -1.0, np.nan, np.inf, 1e30 if dtype == 1 else 6e4]))
            array = np.full(size, value, dtype={1: "<f4", 2: "<f2"}[dtype])
        else:
            array = np.full(size, draw(st.sampled_from([0, 1, 99, 100, -1, 2**31 - 1])),
                            dtype={3: "<i8", 4: "<i4"}[dtype])
        return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=array.tobytes())
    shape = draw(st.one_of(st.sampled_from(ODD_SHAPES), st.lists(_int_strategy(64, True), max_size=6)))
    return tensor_pb2.Tensor(dtype=draw(st.integers(-2, 9)), shape=shape, data=draw(st.binary(max_size=2048)))


def field_values(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    """Values for one (non-repeated) field."""
    if field.name == "version" and field.type == F.TYPE_STRING:
        return st.one_of(st.sampled_from(ODD_VERSIONS), odd_text)
    if field.type == F.TYPE_MESSAGE:
        if field.message_type.full_name == tensor_pb2.Tensor.DESCRIPTOR.full_name:
            return tensors()
        return messages(field.message_type, depth + 1)
    if field.type == F.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-3, 99))
    return SCALARS[field.type]


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _set(message: Message, field: FieldDescriptor, value) -> None:
    if _is_map(field):
        target = getattr(message, field.name)
        target.clear()
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():
            if value_field.type == F.TYPE_MESSAGE:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        target = getattr(message, field.name)
        del target[:]
        if field.type == F.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == F.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def values_for(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    """Values for a field as a whole: a dict for a map, a list for a repeated field."""
    if _is_map(field):
        entry = field.message_type
        return st.dictionaries(field_values(entry.fields_by_name["key"], depth),
                               field_values(entry.fields_by_name["value"], depth), max_size=3)
    if field.name == "shape" and field.type == F.TYPE_INT64:
        return st.one_of(st.sampled_from(ODD_SHAPES), st.lists(field_values(field, depth), max_size=6))
    if field.is_repeated:
        return st.lists(field_values(field, depth), max_size=4 if field.type == F.TYPE_MESSAGE else 8)
    return field_values(field, depth)


@st.composite
def messages(draw, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of `descriptor`'s type with a random subset of its fields set to hostile values."""
    from google.protobuf import message_factory

    message = message_factory.GetMessageClass(descriptor)()
    if depth > 3:
        return message
    for field in descriptor.fields:
        if draw(st.booleans()):
            _set(message, field, draw(values_for(field, depth)))
    return message


@st.composite
def mutated(draw, valid: Callable[[], Message]) -> Message:
    """A valid request with one to three of its top-level fields (or the fields of one of its nested messages)
    replaced by hostile values."""
    message = valid()
    fields = list(message.DESCRIPTOR.fields)
    for field in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique_by=lambda f: f.name)):
        if field.type == F.TYPE_MESSAGE and not _is_map(field) and not field.is_repeated \
                and draw(st.booleans()) and field.message_type.fields:
            inner = getattr(message, field.name)
            sub = draw(st.sampled_from(list(field.message_type.fields)))
            _set(inner, sub, draw(values_for(sub, 1)))
        elif field.is_repeated and field.type == F.TYPE_MESSAGE and not _is_map(field) \
                and len(getattr(message, field.name)) and draw(st.booleans()):
            items = getattr(message, field.name)
            inner = items[draw(st.integers(0, len(items) - 1))]
            sub = draw(st.sampled_from(list(field.message_type.fields)))
            _set(inner, sub, draw(values_for(sub, 1)))
        else:
            _set(message, field, draw(values_for(field, 0)))
    return message


def requests(descriptor: Descriptor, valid: Callable[[], Message] | None) -> st.SearchStrategy[Message]:
    """Hostile requests of one type: built from scratch, or mutated from a valid one when there is one."""
    scratch = messages(descriptor)
    return st.one_of(mutated(valid), mutated(valid), scratch) if valid is not None else scratch


# -- a fixed corpus: every field of a valid request set, in turn, to each known-hostile value ----------------
CORPUS_STRINGS = ["", "digits\n", "²", "n" * 5000, "\x00", "../digits", "é"]
CORPUS_FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 3e38]
CORPUS_BYTES = [b"", b"\xff" * 7, b"\x00" * 3]
# Whole tensors whose data matches their shape, so the shape itself reaches the decoder: (shape, data) pairs.
ODD_CONSISTENT = [([0, 2**62, 2**62], b""), ([1] * 65, b"\x00" * 4), ([0] * 70, b""), ([2**32, 2**32, 0], b"")]
ODD_TENSORS = [tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)  # both dtypes have 4-byte items
               for shape, data in ODD_CONSISTENT for dtype in (tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_INT32)]


def _corpus_values(field: FieldDescriptor) -> list:
    """The hostile values one field takes in the corpus (whole values: lists for repeated fields)."""
    if _is_map(field):
        return [{}]
    if field.is_repeated:
        if field.name == "shape" and field.type == F.TYPE_INT64:
            return ODD_SHAPES
        if field.type == F.TYPE_MESSAGE:
            return [[]]
        single = _corpus_values_single(field)
        return [[], single[: len(single) // 2 + 1], single * 3]
    return _corpus_values_single(field)


def _corpus_values_single(field: FieldDescriptor) -> list:
    if field.type == F.TYPE_STRING:
        return ODD_VERSIONS if field.name == "version" else CORPUS_STRINGS
    if field.type == F.TYPE_BYTES:
        return CORPUS_BYTES
    if field.type == F.TYPE_BOOL:
        return [True, False]
    if field.type == F.TYPE_ENUM:
        return [0, 99, -1]
    if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return CORPUS_FLOATS
    if field.type == F.TYPE_MESSAGE:
        from google.protobuf import message_factory

        empty = message_factory.GetMessageClass(field.message_type)()
        return [empty, *ODD_TENSORS] if field.message_type.full_name == tensor_pb2.Tensor.DESCRIPTOR.full_name \
            else [empty]
    bits = 32 if field.type in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32, F.TYPE_UINT32, F.TYPE_FIXED32) else 64
    signed = field.type not in (F.TYPE_UINT32, F.TYPE_FIXED32, F.TYPE_UINT64, F.TYPE_FIXED64)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return sorted({v for v in [*EDGE_INTS, low, high] if low <= v <= high})


def describe_shape(shape) -> str:
    return str(list(shape)) if len(shape) < 8 else f"[{len(shape)} dims]"


def describe(value) -> str:
    """A short description of a corpus value."""
    if isinstance(value, tensor_pb2.Tensor):
        dtype = tensor_pb2.Dtype.Name(value.dtype).removeprefix("DTYPE_")
        return f"Tensor({dtype}, shape {describe_shape(value.shape)}, {len(value.data)} bytes)"
    shown = f"{type(value).__name__}({text_format.MessageToString(value, as_one_line=True)})" \
        if isinstance(value, Message) else repr(value)
    return shown if len(shown) < 60 else f"{shown[:40]}... ({len(shown)} chars)"


def corpus(valid: Message) -> list[tuple[str, Message]]:
    """(description, message) for every top-level field of `valid`, every field of its nested messages and of
    the first element of its repeated messages, set in turn to each of its hostile values."""
    out: list[tuple[str, Message]] = []

    def visit(path: list, descriptor: Descriptor) -> None:
        for field in descriptor.fields:
            for value in _corpus_values(field):
                message = type(valid)()
                message.CopyFrom(valid)
                target = message
                for step in path:
                    target = getattr(target, step) if isinstance(step, str) else target[step]
                _set(target, field, value)
                out.append((".".join(str(s) for s in [*path, field.name]) + f" = {describe(value)}", message))
            if field.type == F.TYPE_MESSAGE and not _is_map(field):
                holder = valid
                for step in path:
                    holder = getattr(holder, step) if isinstance(step, str) else holder[step]
                if field.is_repeated:
                    if len(getattr(holder, field.name)) and len(path) < 2:
                        visit([*path, field.name, 0], field.message_type)
                elif len(path) < 2:
                    visit([*path, field.name], field.message_type)

    visit([], valid.DESCRIPTOR)
    return out
