"""Fast tier for other model families: the serving head against sentence-transformers' own modules, the prompt
mapping, and the export's refusals with their messages. No Triton here; tests/test_model_families_e2e.py serves
real tiny models end to end."""

import json
import shutil

import numpy as np
import pytest
import torch
from sentence_transformers.sentence_transformer.modules import Dense as StDense
from sentence_transformers.sentence_transformer.modules import Normalize as StNormalize
from sentence_transformers.sentence_transformer.modules import Pooling as StPooling

from export.source_model import UnsupportedModel, _prefixes, default_model_path, load_source_model
from export.steps.sentence_head import ACTIVATIONS, POOLINGS, Dense, Normalize, SentenceHead
from tests.test_export import export


def batch(rng: np.random.Generator, rows=5, width=11, hidden=24):
    tokens = rng.normal(size=(rows, width, hidden)).astype(np.float32)
    lengths = rng.integers(1, width + 1, size=rows)
    lengths[0] = width  # one row without padding
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return tokens, mask


@pytest.mark.parametrize("mode", sorted(POOLINGS))
def test_each_pooling_matches_sentence_transformers(mode):
    tokens, mask = batch(np.random.default_rng(1))
    expected = StPooling(tokens.shape[2], pooling_mode=mode)(
        {"token_embeddings": torch.tensor(tokens), "attention_mask": torch.tensor(mask)}
    )
    served = SentenceHead((mode,), ())(tokens, mask)
    np.testing.assert_allclose(served, expected["sentence_embedding"].numpy(), rtol=1e-5, atol=1e-5)


def test_several_poolings_are_concatenated_in_order():
    tokens, mask = batch(np.random.default_rng(2))
    modes = ("cls", "max", "mean")
    expected = StPooling(tokens.shape[2], pooling_mode=list(modes))(
        {"token_embeddings": torch.tensor(tokens), "attention_mask": torch.tensor(mask)}
    )
    np.testing.assert_allclose(
        SentenceHead(modes, ())(tokens, mask), expected["sentence_embedding"].numpy(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_dense_layers_and_normalize_match_sentence_transformers(activation):
    torch.manual_seed(0)
    tokens, mask = batch(np.random.default_rng(3))
    first = StDense(24, 40, activation_function=getattr(torch.nn, activation)())
    second = StDense(40, 16, bias=False)
    features = StPooling(24, pooling_mode="mean")(
        {"token_embeddings": torch.tensor(tokens), "attention_mask": torch.tensor(mask)}
    )
    for module in (first, second, StNormalize()):
        features = module(features)

    def as_numpy(d) -> Dense:
        return Dense(
            d.linear.weight.detach().numpy(),
            None if d.linear.bias is None else d.linear.bias.detach().numpy(),
            d.activation_function.__class__.__name__,
        )

    head = SentenceHead(("mean",), (as_numpy(first), as_numpy(second), Normalize()))
    np.testing.assert_allclose(head(tokens, mask), features["sentence_embedding"].detach().numpy(), rtol=1e-5, atol=1e-5)


def test_a_head_saved_and_loaded_computes_the_same(tmp_path):
    rng = np.random.default_rng(4)
    tokens, mask = batch(rng)
    head = SentenceHead(("lasttoken",), (Dense(rng.normal(size=(8, 24)).astype(np.float32), None, "GELU"), Normalize()))
    head.save(tmp_path)
    np.testing.assert_array_equal(SentenceHead.load(tmp_path)(tokens, mask), head(tokens, mask))


@pytest.mark.parametrize(
    "config, expected",
    [
        # sentence-transformers 5 writes empty query/document prompts next to a model's own names.
        (
            {
                "prompts": {
                    "query": "",
                    "document": "",
                    "search_query": "search_query: ",
                    "search_document": "search_document: ",
                    "clustering": "clustering: ",
                },
                "default_prompt_name": "clustering",
            },
            {"query": "search_query: ", "document": "search_document: ", "symmetric": "clustering: ", "default": "clustering: "},
        ),
        (
            {"prompts": {"query": "Instruct: find\nQuery:", "document": ""}, "default_prompt_name": None},
            {"query": "Instruct: find\nQuery:", "document": "", "symmetric": "", "default": ""},
        ),
        (
            {"prompts": {"query": "query: ", "passage": "passage: "}},
            {"query": "query: ", "document": "passage: ", "symmetric": "", "default": ""},
        ),
        ({}, {"query": "", "document": "", "symmetric": "", "default": ""}),
    ],
)
def test_prompt_names_map_to_representations(config, expected):
    assert _prefixes(config, "some-model") == expected


def test_a_family_without_declared_prompts_gets_its_published_ones():
    assert _prefixes({}, "e5-small-v2") == {"query": "query: ", "document": "passage: ", "symmetric": "query: ", "default": ""}


@pytest.fixture
def minilm(tmp_path):
    """A writable copy of the packaged all-MiniLM, to break one config at a time."""
    copy = tmp_path / "minilm"
    shutil.copytree(default_model_path(), copy)
    return copy


def edit_json(path, change) -> None:
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def add_module(model_dir, type_name: str, path: str = "2_Extra") -> None:
    edit_json(model_dir / "modules.json", lambda m: m.insert(2, {"idx": 2, "name": "2", "path": path, "type": type_name}))


REFUSALS = {
    "a custom module": (
        lambda d: add_module(d, "my_package.modules.Reranker"),
        ["my_package.modules.Reranker", "Dense and Normalize"],
    ),
    "a sentence-transformers module not served": (
        lambda d: add_module(d, "sentence_transformers.models.LayerNorm"),
        ["LayerNorm", "not supported"],
    ),
    "a pooling mode not listed": (
        lambda d: edit_json(
            d / "1_Pooling" / "config.json", lambda c: c.update(pooling_mode_mean_tokens=False, pooling_mode_median=True)
        ),
        ["pools by nothing", "lasttoken"],
    ),
    "a pooling that leaves the prompt out": (
        lambda d: edit_json(d / "1_Pooling" / "config.json", lambda c: c.update(include_prompt=False)),
        ["include_prompt"],
    ),
    "a Dense activation not listed": (
        lambda d: (
            add_module(d, "sentence_transformers.models.Dense", "2_Dense"),
            (d / "2_Dense").mkdir(),
            (d / "2_Dense" / "config.json").write_text(
                json.dumps({"in_features": 384, "out_features": 64, "activation_function": "torch.nn.modules.activation.SiLU"})
            ),
        ),
        ["SiLU", "GELU"],
    ),
    "no tokenizer.json": (lambda d: (d / "tokenizer.json").unlink(), ["no tokenizer.json", "`tokenizers`"]),
    "a tokenizer.json that tokenizers cannot load": (
        lambda d: (d / "tokenizer.json").write_text("{}"),
        ["cannot be loaded with `tokenizers`"],
    ),
    "a Transformer that is not first": (
        lambda d: edit_json(d / "modules.json", lambda m: m.reverse()),
        ["supported: a Transformer, then a Pooling"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_an_unsupported_model_is_refused_with_what_is_supported(minilm, case):
    breaks, words = REFUSALS[case]
    breaks(minilm)
    with pytest.raises(UnsupportedModel) as refused:
        load_source_model(minilm)
    for word in words:
        assert word in str(refused.value), str(refused.value)


def test_the_export_cli_refuses_before_exporting_and_writes_nothing(minilm, tmp_path):
    add_module(minilm, "my_package.modules.Reranker")
    out = tmp_path / "repository"
    result = export("--model-dir", str(minilm), "--output-dir", str(out))
    assert result.returncode == 2
    assert "my_package.modules.Reranker" in result.stderr and "supported:" in result.stderr
    assert not out.exists()


def test_names_must_pair_with_model_dirs_and_be_distinct(minilm, tmp_path):
    def run(*args):
        return export("--output-dir", str(tmp_path / "r"), *args)

    unpaired = run("--model-dir", str(minilm), "--model-dir", str(minilm), "--name", "one")
    assert unpaired.returncode == 2 and "once per model" in unpaired.stderr
    same = run("--model-dir", str(minilm), "--model-dir", str(default_model_path()), "--name", "x", "--name", "x")
    assert same.returncode == 2 and "one name" in same.stderr


def test_the_served_dimensions_follow_the_head(minilm):
    assert load_source_model(minilm).dimensions == 384
    add_module(minilm, "sentence_transformers.models.Dense", "2_Dense")
    (minilm / "2_Dense").mkdir()
    (minilm / "2_Dense" / "config.json").write_text(
        json.dumps({"in_features": 384, "out_features": 96, "activation_function": "torch.nn.modules.activation.Tanh"})
    )
    source = load_source_model(minilm, "renamed")
    assert (source.name, source.dimensions, [m.kind for m in source.head]) == ("renamed", 96, ["Dense", "Normalize"])


def test_a_name_whose_triton_models_another_model_owns_is_refused(minilm, tmp_path):
    from export.__main__ import _clashes
    from export.repository import model_directories
    from repository_contract.manifest import MANIFEST_FILE as MANIFEST

    (tmp_path / "a-ids").mkdir()
    (tmp_path / "a-ids" / MANIFEST).write_text(json.dumps({"name": "a-ids", "directories": model_directories("a-ids", 128)}))
    clash = _clashes(load_source_model(minilm, "a"), 128, tmp_path)
    assert clash is not None and "a-ids" in clash and "--name" in clash
    assert _clashes(load_source_model(minilm, "b"), 128, tmp_path) is None
    assert _clashes(load_source_model(minilm, "a-ids"), 128, tmp_path) is None, "re-exporting a model over itself is no clash"
