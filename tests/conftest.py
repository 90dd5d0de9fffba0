import json

import pytest

from tests.servers import MODEL_REPOSITORY, start_service


@pytest.fixture(scope="session")
def manifest() -> dict:
    (path,) = MODEL_REPOSITORY.glob("*/embedding_manifest.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def model_name(manifest) -> str:
    return manifest["name"]


@pytest.fixture(scope="session")
def tokenizer(manifest):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(MODEL_REPOSITORY / manifest["tokenizer"]))


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """One real Triton and gateway for the whole test session."""
    running = start_service(tmp_path_factory.mktemp("service"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def models():
    """The exported repository's models, for the in-process HTTP harness (tests.http_harness)."""
    from gateway.core.catalog import Catalog

    return Catalog.from_repository(MODEL_REPOSITORY)


@pytest.fixture
def gateway(models):
    """The real HTTP protocol and app in-process over a fake Triton (tests.http_harness)."""
    from tests.http_harness import Gateway

    return Gateway(models)
