"""tsexplain.serving.kserve: KServe v1/v2 bodies split into instances and answered back."""
import json

import pytest

from tsexplain.serving import kserve
from tsexplain.serving.errors import RequestError


def test_detect_only_kserve_bodies():
    assert kserve.detect({"instances": []}) == {"instances": []}
    assert kserve.detect(b' {"inputs": []}') == {"inputs": []}
    assert kserve.detect('{"instances": ["a"]}') == {"instances": ["a"]}
    for body in ({"data": "x"}, b"\x89PNG...", b"{not json", "plain text", "{\"data\": 1}", b"\xff{"):
        assert kserve.detect(body) is None


def test_v1_instances_with_parameters_and_b64():
    request = kserve.split_request({"instances": ["abc", {"b64": "QUJD", "target": 2}, {"data": "x", "n_steps": 4}],
                                    "parameters": {"n_steps": 8, "target": "cat"}}, 10)
    assert request.protocol == kserve.V1
    assert request.instances == [{"n_steps": 8, "target": "cat", "data": "abc"},
                                 {"n_steps": 8, "target": 2, "data": "QUJD"},
                                 {"n_steps": 4, "target": "cat", "data": "x"}]
    assert kserve.split_request({"instances": ["abc"]}, 1).instances == ["abc"]


def test_v2_elements_and_options():
    body = {"id": "r1", "inputs": [{"name": "in", "shape": [1, 2], "datatype": "BYTES",
                                    "data": ["a text", json.dumps({"data": "other", "target": "pos"})]}],
            "parameters": {"top_k": 2}}
    request = kserve.split_request(body, 10)
    assert (request.protocol, request.request_id, request.input_name) == (kserve.V2, "r1", "in")
    assert request.instances == [{"top_k": 2, "data": "a text"}, {"top_k": 2, "data": "other", "target": "pos"}]
    nested = kserve.split_request({"inputs": [{"name": "in", "shape": [1, 2], "datatype": "BYTES",
                                               "data": [["a", "b"]]}]}, 10)
    assert nested.instances == ["a", "b"]


@pytest.mark.parametrize("body,kind,status", [
    ({"instances": []}, "bad_kserve_request", 400),
    ({"instances": "abc"}, "bad_kserve_request", 400),
    ({"instances": ["a"], "signature_name": "s"}, "bad_kserve_request", 400),
    ({"instances": ["a"], "parameters": [1]}, "bad_kserve_request", 400),
    ({"instances": ["a", "b", "c"]}, "too_many_instances", 413),
    ({"inputs": []}, "bad_kserve_request", 400),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"]}] * 2}, "bad_kserve_request", 400),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "bad_kserve_request", 400),
    ({"inputs": [{"name": "a", "shape": [2], "datatype": "BYTES", "data": ["x"]}]}, "bad_kserve_request", 400),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": [1]}]}, "bad_kserve_request", 400),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "id": 5}, "bad_kserve_request", 400),
    ({"inputs": [{"name": "a", "shape": [3], "datatype": "BYTES", "data": ["x"] * 3}]}, "too_many_instances", 413),
])
def test_bad_envelopes(body, kind, status):
    with pytest.raises(RequestError) as caught:
        kserve.split_request(body, 2)
    assert (caught.value.kind, caught.value.status) == (kind, status)


def test_responses_and_status():
    v1 = kserve.split_request({"instances": ["a", "b"]}, 10)
    entries = [{"cat": 0.9}, kserve.error_entry({"code": 400, "type": "bad_image", "message": "no"})]
    assert entries[1] == {"error": "no", "type": "bad_image", "code": 400}
    assert kserve.response(v1, True, entries) == {"explanations": entries}
    assert kserve.response(v1, False, entries) == {"predictions": entries}
    v2 = kserve.split_request({"inputs": [{"name": "a", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}, 10)
    body = kserve.response(v2, True, entries, request_id="ts-1", model_name="m", model_version="1.0")
    assert body["id"] == "ts-1" and body["model_name"] == "m" and body["model_version"] == "1.0"
    (output,) = body["outputs"]
    assert output["name"] == "explanations" and output["shape"] == [2] and output["datatype"] == "BYTES"
    assert [json.loads(d) for d in output["data"]] == entries
    assert kserve.overall_status([400, 200]) == 200
    assert kserve.overall_status([400, 413, 403]) == 413
    assert kserve.overall_status([503]) == 503
