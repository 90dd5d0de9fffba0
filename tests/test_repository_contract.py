"""The manifest's one reader and one writer (repository_contract.manifest), on the exported model's own manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.servers import MODEL_REPOSITORY
from repository_contract.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    ManifestError,
    manifest_paths,
    owned_directories,
    read,
    read_all,
    recorded_fingerprint,
    write,
)
from repository_contract.targets import CUDA, TARGETS


@pytest.fixture
def exported() -> dict:
    (path,) = manifest_paths(MODEL_REPOSITORY)
    return json.loads(path.read_text())


def written(repository: Path, data: dict) -> Path:
    path = repository / data["ensembles"]["text"] / MANIFEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_what_is_read_is_written_back_unchanged_with_its_version(exported, tmp_path):
    manifest = read(written(tmp_path / "a", exported))
    assert manifest.name == exported["name"] and manifest.compression.size == exported["compression"]["size"]
    assert manifest.layers.ensembles.controlled == exported["layers"]["ensembles"]["controlled"]
    (tmp_path / "b" / manifest.ensembles.text).mkdir(parents=True)  # the export writes the manifest last, into it
    path = write(manifest, tmp_path / "b")
    again = json.loads(path.read_text())
    assert again == {**exported, "format_version": FORMAT_VERSION}
    assert next(iter(again)) == "format_version"
    assert read_all(tmp_path / "b") == [manifest]


def test_a_manifest_from_before_versions_reads_as_version_1(exported, tmp_path):
    exported.pop("format_version", None)
    assert read(written(tmp_path, exported)).format_version == 1


def test_another_version_is_refused_naming_both_versions(exported, tmp_path):
    path = written(tmp_path, {**exported, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ManifestError, match=rf"format version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}: export"):
        read(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("controls"), "without attention controls: export"),
        (lambda m: m.pop("dimensions"), "lacks 'dimensions': export"),
        (lambda m: m["compression"].pop("digest"), "lacks 'digest'"),
        (lambda m: m.update(dimensions="384"), "expected int, found '384'"),
        (lambda m: m.update(max_batch_size=True), "expected int, found True"),
        (lambda m: m.update(directories="all"), "expected a list of strings"),
        (lambda m: m["prefixes"].update(query=None), "expected str, found None"),
    ],
)
def test_a_broken_manifest_is_refused_with_what_is_wrong(exported, tmp_path, change, message):
    change(exported)
    path = written(tmp_path, exported)
    with pytest.raises(ManifestError, match=message) as refused:
        read(path)
    assert str(path) in str(refused.value)


def test_not_json_is_refused_as_a_manifest_error(tmp_path):
    path = tmp_path / "m" / MANIFEST_FILE
    path.parent.mkdir()
    path.write_text("{")
    with pytest.raises(ManifestError, match="is not JSON"):
        read(path)


def test_directories_are_read_from_a_manifest_of_any_version(exported, tmp_path):
    written(tmp_path, {**exported, "format_version": 99})
    assert owned_directories(tmp_path) == {exported["name"]: tuple(exported["directories"])}


def test_the_fingerprint_is_read_from_a_manifest_of_any_version_and_none_without_one(exported, tmp_path):
    written(tmp_path, {**exported, "format_version": 99})
    assert recorded_fingerprint(tmp_path, exported["name"]) == exported["fingerprint"]
    assert recorded_fingerprint(tmp_path, "never-exported") is None


VISION = {
    "ensembles": {"embedding": "tiny-clip-image", "compressed": "tiny-clip-image-c128", "layers": "tiny-clip-image-layers"},
    "controlled": {
        "embedding": "tiny-clip-image-controlled",
        "compressed": "tiny-clip-image-controlled-c128",
        "layers": "tiny-clip-image-controlled-layers",
    },
    "image_tokens": 17,
    "image_size": 32,
    "max_image_pixels": 25_000_000,
    "formats": ["PNG", "JPEG", "WEBP", "GIF"],
    "num_layers": 3,
    "hidden_size": 48,
}


def test_a_text_only_manifest_has_no_vision_and_writes_none(exported, tmp_path):
    assert "vision" not in exported
    manifest = read(written(tmp_path / "a", exported))
    assert manifest.vision is None
    assert "vision" not in manifest.to_dict()


def test_a_vision_section_round_trips(exported, tmp_path):
    from repository_contract.manifest import ImageEnsembles, Vision
    from repository_contract.naming import image_ensembles

    assert image_ensembles("tiny-clip", 128) == VISION["ensembles"]
    assert image_ensembles("tiny-clip", 128, controlled=True) == VISION["controlled"]
    data = {**exported, "vision": VISION}
    manifest = read(written(tmp_path / "a", data))
    assert manifest.vision == Vision(
        ImageEnsembles("tiny-clip-image", "tiny-clip-image-c128", "tiny-clip-image-layers"),
        ImageEnsembles("tiny-clip-image-controlled", "tiny-clip-image-controlled-c128", "tiny-clip-image-controlled-layers"),
        17,
        32,
        25_000_000,
        tuple(VISION["formats"]),
        num_layers=3,
        hidden_size=48,
    )
    (tmp_path / "b" / manifest.ensembles.text).mkdir(parents=True)
    assert json.loads(write(manifest, tmp_path / "b").read_text()) == {**data, "format_version": FORMAT_VERSION}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda v: v.pop("image_tokens"), "lacks 'image_tokens'"),
        (lambda v: v["ensembles"].pop("compressed"), "lacks 'compressed'"),
        # The image pipeline came with its layers: a vision section without them was never written.
        (lambda v: v["ensembles"].pop("layers"), "lacks 'layers'"),
        # Image controls came with the controlled ensembles.
        (lambda v: v.pop("controlled"), "lacks 'controlled'"),
        (lambda v: v.pop("num_layers"), "lacks 'num_layers'"),
        (lambda v: v.pop("hidden_size"), "lacks 'hidden_size'"),
        (lambda v: v.update(num_layers="3"), "expected int, found '3'"),
        (lambda v: v.update(max_image_pixels=2.5e7), "expected int, found 25000000.0"),
        (lambda v: v.update(formats="PNG"), "expected a list of strings"),
    ],
)
def test_a_broken_vision_section_is_refused_with_what_is_wrong(exported, tmp_path, change, message):
    vision = json.loads(json.dumps(VISION))
    change(vision)
    with pytest.raises(ManifestError, match=message):
        read(written(tmp_path, {**exported, "vision": vision}))


def test_a_model_without_compression_round_trips_with_null_compression(exported, tmp_path):
    """A model narrower than the compression size: "compression" is null, and written back as null."""
    data = {**exported, "compression": None}
    manifest = read(written(tmp_path / "a", data))
    assert manifest.compression is None
    (tmp_path / "b" / manifest.ensembles.text).mkdir(parents=True)
    assert json.loads(write(manifest, tmp_path / "b").read_text()) == {**data, "format_version": FORMAT_VERSION}


def test_a_missing_compression_is_refused_not_read_as_none(exported, tmp_path):
    exported.pop("compression")
    with pytest.raises(ManifestError, match="lacks 'compression'"):
        read(written(tmp_path, exported))


def test_names_without_compression_have_no_compressed_ensembles():
    from repository_contract.manifest import ImageEnsembles
    from repository_contract.naming import ensemble_names, image_ensembles

    assert set(ensemble_names("narrow", None)) == {"embedding", "layers"}
    assert ensemble_names("narrow", None)["layers"] == ensemble_names("narrow", 128)["layers"]
    assert image_ensembles("narrow", None) == {"embedding": "narrow-image", "layers": "narrow-image-layers"}
    assert ImageEnsembles.named("narrow", None, controlled=True) == ImageEnsembles(
        "narrow-image-controlled", None, "narrow-image-controlled-layers"
    )


def test_a_vision_section_without_compression_round_trips(exported, tmp_path):
    vision = json.loads(json.dumps(VISION))
    for names in (vision["ensembles"], vision["controlled"]):
        names["compressed"] = None
    data = {**exported, "compression": None, "vision": vision}
    manifest = read(written(tmp_path / "a", data))
    assert manifest.vision is not None and manifest.vision.ensembles.compressed is None
    (tmp_path / "b" / manifest.ensembles.text).mkdir(parents=True)
    assert json.loads(write(manifest, tmp_path / "b").read_text()) == {**data, "format_version": FORMAT_VERSION}


@pytest.mark.parametrize(
    "without_compression, compressed, message",
    [
        # The compressed image ensembles end in the model's compression step: one cannot be without the other.
        (True, "tiny-clip-image-c128", "compressed image ensemble 'tiny-clip-image-c128' for a model without compression"),
        (False, None, "compressed image ensemble None for a model with compression"),
    ],
)
def test_compressed_image_ensembles_without_compression_or_the_reverse_are_refused(
    exported, tmp_path, without_compression, compressed, message
):
    vision = json.loads(json.dumps(VISION))
    vision["ensembles"]["compressed"] = compressed
    if without_compression:
        exported["compression"] = None
    with pytest.raises(ManifestError, match=message):
        read(written(tmp_path, {**exported, "vision": vision}))


def test_a_manifest_without_execution_providers_reads_as_its_targets(exported, tmp_path):
    """Manifests written before the GPU route name no providers: they read as their target's."""
    exported.pop("execution_providers", None)
    for name, target in TARGETS.items():
        assert read(written(tmp_path / name, {**exported, "target": name})).execution_providers == target.execution_providers
    # One that names them reads as written, whatever its target.
    named = {**exported, "target": "gpu-tensorrt-ep", "execution_providers": [CUDA]}
    assert read(written(tmp_path / "named", named)).execution_providers == (CUDA,)
    with pytest.raises(ManifestError, match="unknown target 'nope'"):
        read(written(tmp_path / "unknown", {**exported, "target": "nope"}))
