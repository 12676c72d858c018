"""The published OpenAPI document: examples, descriptions, the error codes, the admin token, the responses each
operation can give, and /docs without a CDN. Read from the app itself (no backbone is loaded: no lifespan)."""

from __future__ import annotations

import re
import typing

import pytest
from fastapi.testclient import TestClient

from kronserve.api import schemas
from kronserve.api.app import create_app
from kronserve.api.errors import _HTTP_CODES
from kronserve.config import Settings
from kronserve.errors import KronserveError


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(Settings(backbone="/not/loaded")))


@pytest.fixture(scope="module")
def spec(client: TestClient) -> dict:
    return client.get("/openapi.json").json()


REQUESTS = [schemas.PredictRequest, schemas.ScoreRequest]
MODELS = [*REQUESTS, schemas.PredictResponse, schemas.ScoreResponse, schemas.AdapterInfo, schemas.ErrorBody]


@pytest.mark.parametrize("model", REQUESTS)
def test_every_request_schema_has_examples_that_validate(spec: dict, model: type) -> None:
    examples = spec["components"]["schemas"][model.__name__]["examples"]
    assert examples
    for example in examples:
        model.model_validate(example)


@pytest.mark.parametrize("model", MODELS)
def test_every_field_is_described(spec: dict, model: type) -> None:
    properties = spec["components"]["schemas"][model.__name__]["properties"]
    assert set(properties) == set(model.model_fields)
    assert all(p.get("description") for p in properties.values()), model.__name__


def all_subclasses(cls: type) -> set[type]:
    return {cls} | {s for c in cls.__subclasses__() for s in all_subclasses(c)}


def test_error_code_is_an_enum_of_every_code_the_api_answers(spec: dict) -> None:
    import kronserve.store  # noqa: F401 - its errors join the hierarchy

    documented = set(spec["components"]["schemas"]["ErrorBody"]["properties"]["code"]["enum"])
    raised = {cls.code for cls in all_subclasses(KronserveError)}
    assert raised | set(_HTTP_CODES.values()) | {"validation_error", "internal"} == documented
    assert set(typing.get_args(schemas.ErrorCode)) == documented


EXPECTED = {
    ("post", "/v1/predict"): {"200", "400", "404", "413", "422", "503"},
    ("post", "/v1/score"): {"200", "400", "404", "413", "422", "503"},
    ("put", "/v1/adapters/{task}"): {"201", "400", "401", "404", "409", "413", "415", "422", "503"},
    ("get", "/v1/adapters/{task}"): {"200", "404", "422", "503"},
    ("delete", "/v1/adapters/{task}"): {"204", "401", "404", "409", "422", "503"},
    ("get", "/v1/adapters"): {"200", "422", "503"},
    ("put", "/v1/adapters/{task}/pin"): {"200", "401", "404", "409", "422", "503"},
    ("delete", "/v1/adapters/{task}/pin"): {"200", "401", "404", "422", "503"},
    ("get", "/healthz"): {"200"},
    ("get", "/readyz"): {"200", "503"},
    ("get", "/metrics"): {"200"},
    ("get", "/v1/models"): {"200", "503"},
    ("get", "/v1/models/{model}"): {"200", "404", "503"},
    ("post", "/v1/completions"): {"200", "400", "404", "413", "422", "503"},
    ("post", "/v1/chat/completions"): {"200", "400", "404", "413", "422", "503"},
}
OPENAI_PATHS = ("/v1/models", "/v1/models/{model}", "/v1/completions", "/v1/chat/completions")


def test_each_operation_documents_the_responses_it_can_give(spec: dict) -> None:
    operations = {(m, path): op for path, ops in spec["paths"].items() for m, op in ops.items()}
    assert {k: set(op["responses"]) for k, op in operations.items()} == EXPECTED
    for (_, path), op in operations.items():
        # kronserve's one error shape, or OpenAI's on its routes; never FastAPI's default HTTPValidationError
        name = "OpenAIErrorResponse" if path in OPENAI_PATHS else "ErrorResponse"
        for status, response in op["responses"].items():
            if int(status) >= 400:
                assert response["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}


def test_the_admin_token_is_a_bearer_scheme_on_the_admin_operations_only(spec: dict) -> None:
    (scheme,) = spec["components"]["securitySchemes"].values()
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    secured = {(m, p) for p, ops in spec["paths"].items() for m, op in ops.items() if op.get("security")}
    admin = {(m, p) for m in ("put", "delete") for p in ("/v1/adapters/{task}", "/v1/adapters/{task}/pin")}
    assert secured == admin


def test_docs_load_nothing_from_outside(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and all(a.startswith("/static-offline-docs/") for a in assets), assets
        for asset in assets:
            r = client.get(asset)
            assert r.status_code == 200 and len(r.content) > 1000, asset
