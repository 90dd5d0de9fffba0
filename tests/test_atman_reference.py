"""The attention-controls (AtMan) reference in tests/atman_reference.py, checked against its definition: without
controls it is sentence-transformers itself, a factor 0 removes a key from every layer and head, a row with nothing
left to attend stays uncontrolled, spans resolve to the right tokens, and the patch really reaches every
architecture and never stays installed."""

import math

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from tests.atman_reference import (
    _key,
    _model,
    content_and_factors,
    controlled_attention,
    controlled_softmax,
    is_patched,
    minilm_path,
    reference_attention_weights,
    reference_embedding,
    reference_hidden_states,
    special_frame,
    text,
)
from tests.tiny_models import BUILDERS, QWEN_QUERY_INSTRUCTION

# Model -> a prefix of its own (its query prompt, or none for all-MiniLM).
PREFIXES = {
    "all-minilm": "",
    "tiny-bert-cls": "query: ",
    "tiny-distilbert-max": "search_query: ",
    "tiny-qwen3": QWEN_QUERY_INSTRUCTION,
}
MODELS = sorted(PREFIXES)
SENTENCE = "The quick brown fox jumps over the lazy dog."
FOX = {"start": SENTENCE.index("fox"), "length": 3}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("atman-tiny-models")
    return {"all-minilm": minilm_path(), **{name: build(root / name) for name, build in BUILDERS.items()}}


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- the definition of the attention weights, on small tensors -------------------------------------------------------


def test_log_additive_weights_are_the_factors_times_the_softmax_numerators():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    factors = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    allowed = torch.ones(3, 3, dtype=torch.bool)
    expected = factors * scores.exp()
    expected = expected / expected.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(controlled_softmax(scores, allowed, factors, True), expected, rtol=1e-12, atol=1e-12)


def test_multiplicative_weights_shift_each_row_by_its_minimum_over_the_attendable_keys():
    scores = torch.tensor([[1.0, 2.0, 3.0], [4.0, -1.0, 2.0], [0.5, 7.0, 9.0]], dtype=torch.float64)
    factors = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    allowed = torch.tril(torch.ones(3, 3, dtype=torch.bool))  # causal: row 2's minimum is over all three keys, row 1's over two
    # Row minima 1, -1 and 0.5; the exponentials of (s - m) * f over each row's keys.
    rows = [
        [math.exp(0.0)],
        [math.exp((4 - -1) * 1.0), math.exp(0.0 * 0.5)],
        [math.exp(0.0), math.exp(6.5 * 0.5), math.exp(8.5 * 2.0)],
    ]
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for q, row in enumerate(rows):
        expected[q, : len(row)] = torch.tensor(row, dtype=torch.float64) / sum(row)
    torch.testing.assert_close(controlled_softmax(scores, allowed, factors, False), expected, rtol=1e-12, atol=1e-12)


def test_a_row_whose_attendable_keys_all_have_factor_zero_is_left_uncontrolled():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [0.3, 0.2, 0.1]], dtype=torch.float64)
    allowed = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    factors = torch.tensor([0.0, 0.0, 4.0], dtype=torch.float64)
    weights = controlled_softmax(scores, allowed, factors, True)
    plain = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    torch.testing.assert_close(weights[:2], plain[:2], rtol=0, atol=0)  # rows 0 and 1 see only factor-0 keys
    assert weights[2, 0] == 0 and weights[2, 1] == 0 and weights[2, 2] == 1  # row 2 still has key 2
    assert not torch.isnan(weights).any()


# --- token positions and factors ------------------------------------------------------------------------------------


def test_partial_and_complete_overlap_on_a_word_split_into_wordpieces():
    # all-MiniLM splits "unbelievably" into un(0,2) ##bel(2,5) ##ie(5,7) ##va(7,9) ##bly(9,12); the span [1, 7)
    # touches un, ##bel, ##ie and covers only ##bel and ##ie. After "query: " (query, :) and [CLS], un is position 3.
    sentence = "unbelievably good"
    span = {"start": 1, "length": 6, "factor": 0.5}
    _, default = content_and_factors(minilm_path(), [text(sentence, span)], "query: ")
    ids, partial = content_and_factors(minilm_path(), [text(sentence, {**span, "token_overlap": "partial"})], "query: ")
    _, complete = content_and_factors(minilm_path(), [text(sentence, {**span, "token_overlap": "complete"})], "query: ")
    tokenizer = _model(_key(minilm_path())).tokenizer
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["[CLS]", "query", ":", "un", "##bel", "##ie", "##va", "##bly", "good", "[SEP]"]
    assert partial == [1, 1, 1, 0.5, 0.5, 0.5, 1, 1, 1, 1]
    assert complete == [1, 1, 1, 1, 0.5, 0.5, 1, 1, 1, 1]
    assert default == partial  # token_overlap defaults to partial


def test_overlapping_controls_multiply():
    sentence = "the cat saw the dog"
    controls = [{"start": 0, "length": 7, "factor": 0.5}, {"start": 4, "length": 7, "factor": 3.0}]  # the cat / cat saw
    _, factors = content_and_factors(minilm_path(), [text(sentence, *controls)])
    assert factors == [1, 0.5, 1.5, 3.0, 1, 1, 1]


def test_items_concatenate_after_the_prefix_and_token_id_controls_count_within_their_item(model_dirs):
    tokenizer = _model(_key(minilm_path())).tokenizer
    hello_world_world = tokenizer("hello world world", add_special_tokens=False)["input_ids"]
    items = [
        text("the cat"),
        {"type": "token_ids", "data": hello_world_world, "controls": [{"index": 1, "factor": 0.3}]},
        text("dog", {"start": 0, "length": 3, "factor": 2.0}),
    ]
    ids, factors = content_and_factors(minilm_path(), items, "query: ")
    assert ids == tokenizer("query: the cat hello world world dog")["input_ids"]
    assert factors == [1, 1, 1, 1, 1, 1, 0.3, 1, 2.0, 1]
    # A token id index outside its item is refused rather than silently ignored.
    with pytest.raises(ValueError, match="outside"):
        content_and_factors(minilm_path(), [{"type": "token_ids", "data": [7592], "controls": [{"index": 1, "factor": 0.3}]}], "")


def test_the_decoder_frame_is_a_trailing_end_of_sequence_that_is_never_controlled(model_dirs):
    qwen = model_dirs["tiny-qwen3"]
    tokenizer = _model(_key(qwen)).tokenizer
    assert special_frame(tokenizer) == ([], [tokenizer.eos_token_id])
    ids, factors = content_and_factors(qwen, [text("the cat", {"start": 0, "length": 7, "factor": 0.0})])
    assert ids == tokenizer("the cat")["input_ids"]
    assert factors[-1] == 1 and set(factors[:-1]) == {0.0}


def test_the_contextual_threshold_spreads_a_control_to_a_repeated_token_only():
    sentence = "the cat saw the dog"
    first_the = {"start": 0, "length": 3, "factor": 0.5}
    _, alone = content_and_factors(minilm_path(), [text(sentence, first_the)])
    _, spread = content_and_factors(minilm_path(), [text(sentence, first_the)], threshold=0.99)
    assert alone == [1, 0.5, 1, 1, 1, 1, 1]
    assert spread == [1, 0.5, 1, 1, 0.5, 1, 1]  # the second "the" (cosine 1), not cat/saw/dog nor the special tokens
    # A control reaching a position both explicitly and contextually still applies once.
    _, once = content_and_factors(minilm_path(), [text(sentence, {"start": 0, "length": 15, "factor": 0.5})], threshold=0.99)
    assert once == [1, 0.5, 0.5, 0.5, 0.5, 1, 1]
    # A threshold of -1 reaches every content position, still never the special tokens.
    _, everywhere = content_and_factors(minilm_path(), [text(sentence, first_the)], threshold=-1.0)
    assert everywhere == [1, 0.5, 0.5, 0.5, 0.5, 0.5, 1]


# --- the patched models ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def plain_models(model_dirs):
    return {name: SentenceTransformer(str(path), device="cpu") for name, path in model_dirs.items()}


@pytest.mark.parametrize("name", MODELS)
def test_without_effective_controls_it_is_sentence_transformers(name, model_dirs, plain_models):
    path, prefix, plain = model_dirs[name], PREFIXES[name], plain_models[name]
    expected = plain.encode(SENTENCE, prompt=prefix)
    ids, _ = content_and_factors(path, [text(SENTENCE)], prefix)
    assert ids == plain[0].preprocess([prefix + SENTENCE])["input_ids"][0].tolist()
    for log_additive in (True, False):
        # A control of factor 1 is present but neutral, in both modes.
        vector = reference_embedding(path, [text(SENTENCE, {**FOX, "factor": 1.0})], prefix, log_additive=log_additive)
        assert vector.dtype == np.float64
        assert cosine(vector, expected) >= 0.999999, (name, log_additive)
    assert not is_patched(_model(_key(path)))


@pytest.mark.parametrize("name", MODELS)
def test_a_different_factor_changes_the_vector(name, model_dirs):
    path, prefix = model_dirs[name], PREFIXES[name]
    uncontrolled = reference_embedding(path, [text(SENTENCE)], prefix)
    for log_additive, factor in ((True, 0.1), (True, 5.0), (False, 0.1), (False, 3.0)):
        vector = reference_embedding(path, [text(SENTENCE, {**FOX, "factor": factor})], prefix, log_additive=log_additive)
        assert cosine(vector, uncontrolled) < 0.99999, (name, log_additive, factor)


@pytest.mark.parametrize("name", MODELS)
def test_factor_zero_removes_a_key_from_every_layer_and_head(name, model_dirs):
    path, prefix = model_dirs[name], PREFIXES[name]
    items = [text(SENTENCE, {**FOX, "factor": 0.0})]
    _, factors = content_and_factors(path, items, prefix)
    zeroed = [i for i, f in enumerate(factors) if f == 0]
    assert zeroed and zeroed[0] > 0  # a key that some row attends next to others (also causally)
    layers = reference_attention_weights(path, items, prefix)
    assert len(layers) == _model(_key(path))[0].auto_model.config.num_hidden_layers
    for weights in layers:
        assert weights.shape[1:] == (len(factors), len(factors))
        assert (weights[:, :, zeroed] == 0).all()
        np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
        others = [k for k in range(len(factors)) if k not in zeroed]
        # Every other key keeps a positive weight where the query may attend it.
        assert (weights[:, zeroed[-1] + 1 :, others] > 0).any()


def test_a_decoder_row_that_sees_only_factor_zero_keys_is_left_uncontrolled(model_dirs):
    # In the decoder, query 1 attends keys 0 and 1 only; with both at factor 0 its row, and so its hidden state in
    # every layer, is the uncontrolled one, while later positions (which also see factor-1 keys) do change.
    qwen = model_dirs["tiny-qwen3"]
    zero_first_two = [{"index": 0, "factor": 0.0}, {"index": 1, "factor": 0.0}]
    items = [{"type": "token_ids", "data": [300, 301, 302, 303, 304], "controls": zero_first_two}]
    plain_items = [{"type": "token_ids", "data": [300, 301, 302, 303, 304]}]
    assert content_and_factors(qwen, items, "")[1] == [0.0, 0.0, 1, 1, 1, 1]
    controlled, plain = reference_hidden_states(qwen, items), reference_hidden_states(qwen, plain_items)
    assert controlled.shape == plain.shape == (3, 6, 192)
    np.testing.assert_allclose(controlled[:, :2], plain[:, :2], rtol=0, atol=1e-12)
    assert not np.allclose(controlled[1:, 2:], plain[1:, 2:], rtol=0, atol=1e-6)
    for weights, plain_weights in zip(reference_attention_weights(qwen, items), reference_attention_weights(qwen, plain_items)):
        np.testing.assert_allclose(weights[:, :2], plain_weights[:, :2], rtol=0, atol=1e-12)
        assert (weights[:, 2:, :2] == 0).all()


def test_hidden_states_start_with_the_embeddings_and_end_with_the_token_embeddings(model_dirs):
    path = model_dirs["tiny-bert-cls"]
    hidden = reference_hidden_states(path, [text(SENTENCE)], "query: ")
    model = _model(_key(path))
    ids, _ = content_and_factors(path, [text(SENTENCE)], "query: ")
    with torch.inference_mode():
        embeddings = model[0].auto_model.embeddings(input_ids=torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(hidden[0], embeddings, rtol=0, atol=1e-12)
    assert hidden.shape == (3, len(ids), 192)


def test_the_patch_is_scoped_to_its_block_even_on_an_error(model_dirs):
    for name in ("all-minilm", "tiny-distilbert-max", "tiny-qwen3"):
        model = _model(_key(model_dirs[name]))
        with pytest.raises(RuntimeError, match="inside"):
            with controlled_attention(model, [1.0, 1.0], True):
                assert is_patched(model)
                raise RuntimeError("inside")
        assert not is_patched(model)
