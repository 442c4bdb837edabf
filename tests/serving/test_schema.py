"""Request parsing: valid forms, clear 4xx errors, and a hypothesis fuzz."""
import base64
import json

import pytest
from hypothesis import given, settings, strategies as st

from tsexplain.serving.errors import RequestError
from tsexplain.serving.schema import IMAGE, TEXT, Limits, parse, resolve_target

IMAGE_BYTES = b"\x89PNG fake bytes"
B64 = base64.b64encode(IMAGE_BYTES).decode()
LIMITS = Limits(max_n_steps=128, max_text_chars=100)


def parse_image_request(row):
    return parse(row, IMAGE, LIMITS)


def parse_text_request(row, max_chars, max_n_steps):
    return parse(row, TEXT, Limits(max_n_steps, max_chars))


def test_raw_bytes_and_base64_text():
    assert parse_image_request({"body": bytearray(IMAGE_BYTES)}).data == IMAGE_BYTES
    assert parse_image_request({"data": B64}).data == IMAGE_BYTES


def test_json_object_decoded_by_torchserve_or_raw():
    fields = {"data": B64, "target": "star", "outputs": ["overlay_png", "heatmap"], "heatmap_size": "input", "top_k": 2}
    for body in (fields, json.dumps(fields).encode()):
        req = parse_image_request({"body": body})
        assert req.data == IMAGE_BYTES and req.target == "star" and req.top_k == 2
        assert req.outputs == ("overlay_png", "heatmap") and req.heatmap_size == "input"
    assert parse_image_request({"body": {"data": B64, "target": "predicted"}}).target is None


@pytest.mark.parametrize("body,kind", [
    (b'{"data": ', "bad_json"),
    ([1, 2], "bad_json"),
    ({"data": 5}, "bad_data"),
    ({"data": "!!!"}, "bad_base64"),
    ({"data": B64, "target": 1.5}, "bad_target"),
    ({"data": B64, "target": True}, "bad_target"),
    ({"data": B64, "outputs": ["heatmap", "saliency"]}, "bad_outputs"),
    ({"data": B64, "heatmap_size": "huge"}, "bad_heatmap_size"),
    ({"data": B64, "top_k": 0}, "bad_top_k"),
    ({"data": B64, "taget": 1}, "unknown_field"),
])
def test_bad_requests_are_400_with_a_type(body, kind):
    with pytest.raises(RequestError) as info:
        parse_image_request({"body": body})
    assert info.value.kind == kind and info.value.status == 400
    assert info.value.to_json()["code"] == 400


def test_resolve_target():
    labels = ["circle", "square", "star"]
    assert resolve_target(None, labels) is None
    assert resolve_target(2, labels) == 2
    assert resolve_target("square", labels) == 1
    assert resolve_target("2", labels) == 2
    for bad in (3, -1, "hexagon"):
        with pytest.raises(RequestError) as info:
            resolve_target(bad, labels)
        assert info.value.kind == "unknown_target"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
fields = st.fixed_dictionaries({}, optional={
    "data": st.one_of(st.just(B64), st.text(max_size=30), json_values),
    "target": json_values, "outputs": json_values, "heatmap_size": json_values,
    "top_k": json_values, "method": json_values, "priority": json_values,
})


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(st.binary(max_size=200), fields, fields.map(lambda d: json.dumps(d).encode()), json_values))
def test_fuzz_only_request_errors(body):
    """Whatever the body, parsing returns a request or raises RequestError, nothing else."""
    try:
        req = parse_image_request({"body": body})
    except RequestError as error:
        assert 400 <= error.status < 500 and error.message
    else:
        assert isinstance(req.data, bytes)


def test_text_contrast_field():
    req = parse_text_request({"body": {"data": "ok", "target": "positive", "contrast": "negative"}}, 100, 10)
    assert req.contrast == "negative" and req.target == "positive"
    assert parse_text_request({"body": {"data": "ok", "contrast": 0}}, 100, 10).contrast == 0
    assert parse_text_request({"body": b"ok"}, 100, 10).contrast is None
    for bad in (1.5, True, "", [0]):
        with pytest.raises(RequestError) as info:
            parse_text_request({"body": {"data": "ok", "contrast": bad}}, 100, 10)
        assert info.value.kind == "bad_contrast"
    assert resolve_target("negative", ["negative", "positive"], "contrast") == 0
    with pytest.raises(RequestError) as info:
        resolve_target(2, ["negative", "positive"], "contrast")
    assert info.value.kind == "unknown_contrast" and "contrast" in info.value.message
