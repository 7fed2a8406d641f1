"""openapi.yaml against a standard validator, and the real cpt-server's responses against its schemas."""

import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from test_hf_parity import ROOT, TARGET

SPEC = yaml.safe_load((ROOT / "openapi.yaml").read_text())
SERVER = pathlib.Path(os.environ.get("CPT_SERVER", TARGET / "release/cpt-server"))
REGISTRY = Registry().with_resource("urn:openapi", Resource.from_contents(SPEC, default_specification=DRAFT202012))


def test_openapi_yaml_is_a_valid_openapi_document():
    validate(SPEC)


def pointer(*parts):
    return "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def check(path, method, status, body):
    """Validates a JSON body against the documented response schema of (path, method, status)."""
    documented = SPEC["paths"][path][method]["responses"][str(status)]
    if "$ref" in documented:  # the shared error response
        ref = "urn:openapi#/components/schemas/Error"
    else:
        ref = "urn:openapi#/" + pointer("paths", path, method, "responses", str(status), "content", "application/json", "schema")
    OAS31Validator({"$ref": ref}, registry=REGISTRY).validate(body)


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, method=method, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(base, process):
    """Polls /readyz of a cpt-server just started (a process: its exit is a failure, not a wait)."""
    for _ in range(500):
        try:
            urllib.request.urlopen(base + "/readyz").read()
            return
        except OSError:
            assert process.poll() is None, "cpt-server exited"
            time.sleep(0.02)
    raise AssertionError(f"{base} was not ready within 10 s")


def serve(tmp_path, token=None):
    """A real cpt-server on a free loopback port with a data root holding a model config and a
    dataset manifest; with `token`, both tokens are set to it. Yields (base URL, data root)."""
    assert SERVER.exists(), f"{SERVER} is missing: cargo build --release"
    root = tmp_path / "root"
    (root / "model").mkdir(parents=True)
    (root / "model/config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "tie_word_embeddings": True}))
    (root / "data").mkdir()
    split = {"documents": 4, "tokens": 128, "blocks": 4, "dropped_tail_tokens": 0, "shards": []}
    (root / "data/manifest.json").write_text(json.dumps({"seq_len": 32, "vocab_size": 256, "splits": {"train": split, "validation": split}}))
    port = free_port()
    tokens = ["--api-token", token, "--worker-token", token] if token else []
    process = subprocess.Popen([str(SERVER), "--data-dir", str(tmp_path / "db"), "--bind", f"127.0.0.1:{port}",
                                "--data-roots", str(root), "--local-workers", "0", *tokens], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(base, process)
    yield base, root
    process.terminate()
    assert process.wait(timeout=30) == 0, "cpt-server shuts down cleanly on SIGTERM"


@pytest.fixture
def server(tmp_path):
    yield from serve(tmp_path)


def test_responses_match_their_documented_schemas(server):
    base, root = server
    spec = {"name": "t", "base_model": str(root / "model"), "train_data": [{"dataset": str(root / "data")}],
            "eval_data": {"domain": str(root / "data")}, "seq_len": 32, "max_steps": 4}
    status, body = call(base, "POST", "/v1/jobs?dry_run=true", spec)
    check("/v1/jobs", "post", status, body)
    status, job = call(base, "POST", "/v1/jobs", spec)
    assert status == 201
    check("/v1/jobs", "post", status, job)
    status, body = call(base, "POST", "/v1/jobs", {**spec, "seq_len": 0})
    assert status == 422
    check("/v1/jobs", "post", status, body)
    status, body = call(base, "GET", "/v1/jobs?limit=1")
    check("/v1/jobs", "get", status, body)
    check("/v1/jobs/{id}", "get", *call(base, "GET", "/v1/jobs/" + job["id"]))
    check("/v1/jobs/{id}", "get", *call(base, "GET", "/v1/jobs/none"))
    bare = urllib.request.Request(base + "/v1/workers", method="POST", data=b'{"name": "w"}')
    with pytest.raises(urllib.error.HTTPError) as rejected:
        urllib.request.urlopen(bare)
    assert rejected.value.code == 415
    check("/v1/workers", "post", 400, json.loads(rejected.value.read()))  # any Error-shaped body
    status, worker = call(base, "POST", "/v1/workers", {"name": "w"})
    check("/v1/workers", "post", status, worker)
    wid = worker["worker_id"]
    status, leased = call(base, "POST", f"/v1/workers/{wid}/lease")
    check("/v1/workers/{id}/lease", "post", status, leased)
    check("/v1/workers/{id}/heartbeat", "post", *call(base, "POST", f"/v1/workers/{wid}/heartbeat", {"job_id": job["id"], "attempt": 1}))
    step = {"seq": 0, "time": 1, "kind": "step", "step": 1, "loss": 2.0, "lr": 1e-4, "grad_norm": 1.0, "skipped": False,
            "tokens": 32, "tokens_total": 32, "tokens_per_second": 10.0, "flops": 1.0, "flops_total": 1.0,
            "flops_per_second": 1.0, "mfu": 0.1, "step_seconds": 1.0, "data_seconds": 0.1, "compute_seconds": 0.9}
    batch = {"job_id": job["id"], "attempt": 1, "events": [step]}
    check("/v1/workers/{id}/events", "post", *call(base, "POST", f"/v1/workers/{wid}/events", batch))
    check("/v1/jobs/{id}/events", "get", *call(base, "GET", f"/v1/jobs/{job['id']}/events"))
    check("/v1/jobs/{id}/metrics", "get", *call(base, "GET", f"/v1/jobs/{job['id']}/metrics"))
    check("/v1/jobs/{id}/checkpoints", "get", *call(base, "GET", f"/v1/jobs/{job['id']}/checkpoints"))
    check("/v1/jobs/{id}/cancel", "post", *call(base, "POST", f"/v1/jobs/{job['id']}/cancel"))
    status, done = call(base, "POST", f"/v1/workers/{wid}/finish", {"job_id": job["id"], "attempt": 1, "outcome": "cancelled"})
    assert done["state"] == "cancelled"
    check("/v1/workers/{id}/finish", "post", status, done)
    check("/v1/jobs/{id}/resume", "post", *call(base, "POST", f"/v1/jobs/{job['id']}/resume"))
    check("/v1/jobs/{id}/resume", "post", *call(base, "POST", f"/v1/jobs/{job['id']}/resume"))
    (root / "text.txt").write_text("Some text to prepare.\n")
    (root / "tokenizer.json").write_text("{}")
    request = {"name": "d", "tokenizer": str(root / "tokenizer.json"), "inputs": [str(root / "text.txt")], "config": {"seq_len": 8}}
    status, dataset = call(base, "POST", "/v1/datasets", request)
    assert status == 201
    check("/v1/datasets", "post", status, dataset)
    check("/v1/datasets", "post", *call(base, "POST", "/v1/datasets", {**request, "config": {"seq_len": "long"}}))
    check("/v1/datasets", "get", *call(base, "GET", "/v1/datasets"))
    check("/v1/datasets/{id}", "get", *call(base, "GET", "/v1/datasets/" + dataset["id"]))
    (root / "model/tokenizer.json").write_text("{}")
    request = {"name": "v", "base_model": str(root / "model"), "corpus": [str(root / "text.txt")], "new_tokens": 10}
    status, vocabulary = call(base, "POST", "/v1/vocabularies", request)
    assert status == 201
    check("/v1/vocabularies", "post", status, vocabulary)
    status, body = call(base, "POST", "/v1/vocabularies", {**request, "base_model": str(root / "data")})
    assert (status, body["error"]["field"]) == (422, "base_model")
    check("/v1/vocabularies", "post", status, body)
    check("/v1/vocabularies", "get", *call(base, "GET", "/v1/vocabularies"))
    check("/v1/vocabularies/{id}", "get", *call(base, "GET", "/v1/vocabularies/" + vocabulary["id"]))
    check("/v1/vocabularies/{id}", "get", *call(base, "GET", "/v1/vocabularies/" + dataset["id"]))
    status, jobs = call(base, "GET", "/v1/jobs")
    assert {job["kind"] for job in jobs["jobs"]} == {"train", "prepare", "extend_vocab"}
    check("/v1/jobs", "get", status, jobs)
    sweep = {"name": "s", "base": spec, "grid": {"lr": [1e-4, 1e-3]}}
    check("/v1/sweeps", "post", *call(base, "POST", "/v1/sweeps?dry_run=true", sweep))
    status, made = call(base, "POST", "/v1/sweeps", sweep)
    assert status == 201 and len(made["jobs"]) == 2
    check("/v1/sweeps", "post", status, made)
    status, body = call(base, "POST", "/v1/sweeps", {**sweep, "grid": {"lr": [1e-4, 2.0]}})
    assert (status, body["error"]["field"]) == (422, "grid.lr")
    check("/v1/sweeps", "post", status, body)
    check("/v1/sweeps", "get", *call(base, "GET", "/v1/sweeps"))
    check("/v1/sweeps/{id}", "get", *call(base, "GET", "/v1/sweeps/" + made["id"]))
    check("/v1/sweeps/{id}", "get", *call(base, "GET", "/v1/sweeps/none"))
    with urllib.request.urlopen(f"{base}/v1/sweeps/{made['id']}/plot.svg?x=domain&y=domain") as plot:
        assert plot.headers["Content-Type"] == "image/svg+xml" and plot.read().startswith(b"<svg")
    check("/v1/sweeps/{id}/cancel", "post", *call(base, "POST", f"/v1/sweeps/{made['id']}/cancel"))
    status, resumed = call(base, "POST", f"/v1/sweeps/{made['id']}/resume")
    assert resumed["state"] == "queued"
    check("/v1/sweeps/{id}/resume", "post", status, resumed)
