"""The Triton Python-backend steps (export/steps/) run here without Triton, on the exported model (fast tier).

Each step's source is loaded from export/steps/ the way Triton's Python backend loads a model.py (a module of its
own, not a package), with a stand-in for `triton_python_backend_utils` in sys.modules and repository_contract/ on
sys.path for the tensor names (the export copies tensors.py next to each model.py instead), and is initialized with
the args Triton would give it: the model directory in model_repository/ and its config.pbtxt as JSON. Its answers are
checked against the tokenizers library, plain onnxruntime on the same ONNX (one row at a time, unpadded) and plain
numpy, so a row gathered from, sorted into or scattered back to the wrong place, or padding that leaks in, fails.
The same steps inside a real Triton: the *_e2e.py tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from google.protobuf import json_format, text_format
from tokenizers import Tokenizer
from tritonclient.grpc import model_config_pb2

from harness import python_backend
from harness.python_backend import (
    STEPS,
    InferenceRequest,
    InferenceResponse,
    TritonError,
    output,
    request,
)
from harness.servers import MODEL_REPOSITORY
from repository_contract import tensors
from repository_contract.tensors import (
    ATTENTION_MASK,
    CONTROL_FACTORS,
    CONTROL_LOG_ADDITIVE,
    EMBEDDING,
    HIDDEN_STATES,
    ID_PADDING,
    INPUT_IDS,
    POOLED,
    TEXT,
    TOKEN_COUNT,
    TOKEN_EMBEDDINGS,
    TOKEN_IDS,
    onnx_name,
)

TEXTS = [
    "A man is playing a guitar.",
    "Triton batches requests of equal shape together, and the encoder takes ragged ones.",
    "short",
    "How do I reset my password? I have tried everything, twice, and it still says no.",
    "The new movie is awesome.",
    "a b c d e f g",
    "Ragged batches are gathered, sorted by length, run in slices and scattered back.",
]


# -- loading a step as Triton does (harness.python_backend) -----------------------------------------------------------


def triton_args(model_dir: Path, **parameters: str) -> dict[str, str]:
    """What Triton passes to initialize() for model_dir: its config.pbtxt as JSON, with `parameters` overriding its own."""
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    # Triton's JSON holds every field, empty ones too (an empty length_buckets is a string_value of "").
    as_json = json_format.MessageToDict(config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for key, value in parameters.items():
        as_json.setdefault("parameters", {})[key] = {"string_value": value}
    return python_backend.triton_args(model_dir, as_json)


def load_step(source: str, model_dir: Path, lock_dir: Path | None = None, **parameters: str):
    """The TritonPythonModel of export/steps/<source>.py, initialized for model_dir (see harness.python_backend).
    lock_dir: the temporary directory for the encoder, which keeps a lock file per instance there."""
    return python_backend.load_step(source, triton_args(model_dir, **parameters), lock_dir)


@pytest.fixture(scope="module", autouse=True)
def packed_graphs(tmp_path_factory):
    """One cache of packed graphs for this module's encoder loads, which would otherwise each write their own into
    their lock directory; its entries are keyed by the model file, so sharing it changes no answer."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBED_PACKED_GRAPHS", str(tmp_path_factory.mktemp("packed-graphs")))
        yield


@pytest.fixture(scope="module")
def steps(manifest) -> dict[str, Path]:
    return {role: MODEL_REPOSITORY / name for role, name in manifest["steps"].items()}


@pytest.fixture(scope="module")
def reference_encoder(steps) -> ort.InferenceSession:
    return ort.InferenceSession(str(steps["encoder"] / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def encoder(steps, tmp_path_factory):
    # Slices of 3 rows, so that one slice holds rows of several requests and one request's rows span slices.
    locks = tmp_path_factory.mktemp("encoder-locks")
    step = load_step("encoder", steps["encoder"], locks, slice_rows="3", intra_op_threads="1", alone_intra_op_threads="1")
    yield step
    step.sessions.siblings.own.close()  # the lock file the instance holds open for its life


def text_tensor(texts: Sequence[str | bytes]) -> np.ndarray:
    return np.array([t.encode() if isinstance(t, str) else t for t in texts], dtype=np.object_).reshape(-1, 1)


# -- the tokenizer steps ---------------------------------------------------------------------------------------------


def test_the_tokenizer_step_pads_each_request_to_its_own_longest_text(steps, tokenizer, manifest):
    step = load_step("tokenizer", steps["tokenizer"])
    batches = [TEXTS[:3], TEXTS[3:4], TEXTS[4:]]
    responses = step.execute([request({TEXT: text_tensor(texts)}) for texts in batches])
    assert len(responses) == len(batches)
    for texts, response in zip(batches, responses):
        ids, mask, counts = (output(response, name) for name in (INPUT_IDS, ATTENTION_MASK, TOKEN_COUNT))
        expected = [tokenizer.encode(text).ids for text in texts]
        width = max(len(e) for e in expected)
        assert ids.shape == mask.shape == (len(texts), width)
        assert counts.tolist() == [[len(e)] for e in expected] and counts.dtype == np.int32
        for row, e in enumerate(expected):
            assert ids[row, : len(e)].tolist() == e
            assert (ids[row, len(e) :] == manifest["pad_token_id"]).all()
            assert mask[row].tolist() == [1] * len(e) + [0] * (width - len(e))


def test_an_overlong_text_is_cut_at_the_models_length_and_counted_whole(steps, tokenizer, manifest):
    step = load_step("tokenizer", steps["tokenizer"])
    limit = manifest["max_sequence_length"]
    long_text = " ".join(TEXTS * 8)
    (response,) = step.execute([request({TEXT: text_tensor([long_text, "short"])})])
    full = tokenizer.encode(long_text).ids
    assert len(full) > limit
    truncating = Tokenizer.from_str(tokenizer.to_str())
    truncating.enable_truncation(limit)
    ids = output(response, INPUT_IDS)
    assert ids.shape == (2, limit)
    assert ids[0].tolist() == truncating.encode(long_text).ids
    assert ids[0, -1] == full[-1]  # still framed: the separator closes the cut text
    assert output(response, TOKEN_COUNT).reshape(-1).tolist() == [len(full), len(tokenizer.encode("short").ids)]


def test_a_request_that_does_not_truncate_has_an_overlong_text_refused_alone(steps, tokenizer, manifest):
    step = load_step("tokenizer", steps["tokenizer"])
    long_text = " ".join(TEXTS * 8)
    count = len(tokenizer.encode(long_text).ids)
    strict = {"truncate": False}
    responses = step.execute(
        [
            request({TEXT: text_tensor(["short", long_text])}, parameters=strict),
            request({TEXT: text_tensor(["short", long_text])}),  # no parameter: cut, as before
            request({TEXT: text_tensor(["fits"])}, parameters=strict),
        ]
    )
    error = responses[0].error()
    assert error is not None and error.code() == TritonError.INVALID_ARG
    limit = manifest["max_sequence_length"]
    assert error.message() == f"tokenizer: row 1: a text has {count} tokens, more than the {limit} the model reads"
    assert output(responses[1], TOKEN_COUNT).reshape(-1).tolist()[1] == count
    assert output(responses[2], INPUT_IDS)[0].tolist() == tokenizer.encode("fits").ids


def test_a_request_that_is_not_utf8_fails_alone(steps, tokenizer):
    step = load_step("tokenizer", steps["tokenizer"])
    responses = step.execute(
        [
            request({TEXT: text_tensor(["fine"])}),
            request({TEXT: text_tensor([b"\xff\xfe"])}),
            request({TEXT: text_tensor(["also fine"])}),
        ]
    )
    assert responses[1].has_error() and responses[1].error().message().startswith("tokenizer:")
    assert output(responses[0], INPUT_IDS)[0].tolist() == tokenizer.encode("fine").ids
    assert output(responses[2], INPUT_IDS)[0].tolist() == tokenizer.encode("also fine").ids


def test_length_buckets_pad_each_request_to_the_smallest_bucket_that_holds_it(steps, tokenizer):
    step = load_step("tokenizer", steps["tokenizer"], length_buckets="8,16,64")
    responses = step.execute([request({TEXT: text_tensor([text])}) for text in TEXTS])
    for text, response in zip(TEXTS, responses):
        length = len(tokenizer.encode(text).ids)
        assert output(response, INPUT_IDS).shape[1] == next(b for b in (8, 16, 64) if b >= length)
        assert output(response, ATTENTION_MASK).sum() == length


def id_rows(sequences: list[list[int]], fill: float = ID_PADDING, dtype=np.int64) -> np.ndarray:
    """Rows padded as the gateway pads them (with ID_PADDING for ids)."""
    rows = np.full((len(sequences), max(len(s) for s in sequences)), fill, dtype=dtype)
    for index, sequence in enumerate(sequences):
        rows[index, : len(sequence)] = sequence
    return rows


def test_the_token_ids_step_frames_ids_as_the_tokenizer_frames_a_text(steps, tokenizer, manifest):
    step = load_step("tokenizer", steps["token-ids"])
    limit = manifest["max_sequence_length"]
    overlong = list(range(2000, 2000 + limit + 20))
    bare = [tokenizer.encode(text, add_special_tokens=False).ids for text in TEXTS[:4]] + [overlong]
    responses = step.execute([request({TOKEN_IDS: id_rows(bare[:2])}), request({TOKEN_IDS: id_rows(bare[2:])})])
    ids = [row for response in responses for row in output(response, INPUT_IDS)]
    masks = [row for response in responses for row in output(response, ATTENTION_MASK)]
    counts = [int(c) for response in responses for c in output(response, TOKEN_COUNT).reshape(-1)]
    for index, text in enumerate(TEXTS[:4]):
        framed = tokenizer.encode(text).ids  # the text's own framing, [CLS] ... [SEP]
        assert ids[index][: masks[index].sum()].tolist() == framed
        assert counts[index] == len(framed)
    cls, sep = tokenizer.encode("").ids
    assert ids[4].tolist() == [cls, *overlong[: limit - 2], sep]
    assert counts[4] == len(overlong) + 2


def test_the_controlled_ids_step_frames_and_pads_the_factors_with_the_ids(steps, tokenizer):
    step = load_step("tokenizer", steps["controlled-ids"])
    bare = [tokenizer.encode(text, add_special_tokens=False).ids for text in TEXTS[:3]]
    factors = [[0.5 + i for i in range(len(ids))] for ids in bare]
    (response,) = step.execute(
        [request({TOKEN_IDS: id_rows(bare), CONTROL_FACTORS: id_rows(factors, fill=7.0, dtype=np.float32)})]
    )
    ids, mask, framed_factors = (output(response, name) for name in (INPUT_IDS, ATTENTION_MASK, CONTROL_FACTORS))
    assert framed_factors.shape == ids.shape and framed_factors.dtype == np.float32
    for row, (sequence, row_factors) in enumerate(zip(bare, factors)):
        length = int(mask[row].sum())
        assert length == len(sequence) + 2
        assert ids[row, 1 : length - 1].tolist() == sequence
        # 1 at the special tokens and the padding; the -1-padded ids' factors (7 here) are dropped with them.
        assert framed_factors[row].tolist() == [1.0, *row_factors, 1.0] + [1.0] * (ids.shape[1] - length)


# -- the encoder: ragged batches gathered, sorted, sliced and scattered back -------------------------------------------


def ragged_requests(tokenizer, groups: list[list[str]], extra_width: list[int], rng: np.random.Generator):
    """One request per group of texts, each padded to its own width (its longest row plus extra), with junk ids under
    the mask's zeros: the encoder must read each row's real tokens only."""
    made = []
    for texts, extra in zip(groups, extra_width):
        sequences = [tokenizer.encode(text).ids for text in texts]
        width = max(len(s) for s in sequences) + extra
        ids = rng.integers(1000, 20000, size=(len(texts), width)).astype(np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        made.append((sequences, ids, mask))
    return made


def alone(
    session: ort.InferenceSession, sequence: list[int], controls: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """The ONNX's outputs for one unpadded row (and its controls, for the controlled graph), by the steps' names."""
    feeds = {INPUT_IDS: np.array([sequence], dtype=np.int64), ATTENTION_MASK: np.ones((1, len(sequence)), dtype=np.int64)}
    names = [TOKEN_EMBEDDINGS, HIDDEN_STATES]
    outputs = session.run([onnx_name(n) for n in names], {onnx_name(n): value for n, value in (feeds | (controls or {})).items()})
    return {name: value[0] for name, value in zip(names, outputs)}


GROUPS = [TEXTS[0:2], TEXTS[2:5], TEXTS[5:6], TEXTS[6:7]]


def test_the_encoder_answers_each_row_of_a_ragged_batch_as_if_it_ran_alone(encoder, reference_encoder, tokenizer):
    made = ragged_requests(tokenizer, GROUPS, [0, 3, 5, 1], np.random.default_rng(0))
    wanted = [[TOKEN_EMBEDDINGS], [TOKEN_EMBEDDINGS], [HIDDEN_STATES], [TOKEN_EMBEDDINGS, HIDDEN_STATES]]
    responses = encoder.execute(
        [request({INPUT_IDS: ids, ATTENTION_MASK: mask}, names) for (_, ids, mask), names in zip(made, wanted)]
    )
    assert len(responses) == len(made)
    for (sequences, ids, _), names, response in zip(made, wanted, responses):
        assert sorted(tensor.name() for tensor in response.output_tensors()) == sorted(names)
        for row, sequence in enumerate(sequences):
            expected = alone(reference_encoder, sequence)
            length = len(sequence)
            if TOKEN_EMBEDDINGS in names:
                tokens = output(response, TOKEN_EMBEDDINGS)
                assert tokens.shape == (len(sequences), ids.shape[1], 384)
                np.testing.assert_allclose(tokens[row, :length], expected[TOKEN_EMBEDDINGS], atol=2e-4, rtol=1e-3)
                assert not tokens[row, length:].any()  # padded positions hold zeros
            if HIDDEN_STATES in names:
                hidden = output(response, HIDDEN_STATES)
                assert hidden.shape == (len(sequences), 7, ids.shape[1], 384)
                np.testing.assert_allclose(hidden[row, :, :length], expected[HIDDEN_STATES], atol=2e-4, rtol=1e-3)
                assert not hidden[row, :, length:].any()


def test_thread_spinning_is_off_unless_exported_on_and_always_stops_when_a_run_ends(steps, tmp_path):
    # The export's default, then spinning asked for: each of the step's two sessions gets what its config says.
    for setting, spinning in [({}, "0"), ({"thread_spinning": "1"}, "1")]:
        locks = tmp_path / spinning
        locks.mkdir()
        step = load_step("encoder", steps["encoder"], locks, **setting)
        try:
            for session in (step.sessions.busy, step.sessions.alone):
                options = session.get_session_options()
                assert options.get_session_config_entry("session.intra_op.allow_spinning") == spinning
                assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        finally:
            step.sessions.siblings.own.close()


def test_every_session_of_every_instance_maps_one_packed_graph_written_once(steps, tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "packed"
    monkeypatch.setenv("EMBED_PACKED_GRAPHS", str(cache))
    for instance in ("plain", "first", "second"):
        (tmp_path / instance).mkdir()
    plain = load_step("encoder", steps["encoder"], tmp_path / "plain", shared_weights="0")
    first = load_step("encoder", steps["encoder"], tmp_path / "first", shared_weights="1")
    written = sorted(p for p in (cache / steps["encoder"].name).iterdir() if p.name != ".lock")
    assert len(written) == 1, written
    graph, data = written[0] / "model.onnx", written[0] / "model.data"
    mtime = data.stat().st_mtime_ns
    second = load_step("encoder", steps["encoder"], tmp_path / "second", shared_weights="1")
    try:
        # The second instance maps what the first wrote, and so does each one's busy and alone session.
        assert data.stat().st_mtime_ns == mtime
        for step in (first, second):
            assert {step.sessions.busy._model_path, step.sessions.alone._model_path} == {str(graph)}
        assert plain.sessions.alone._model_path == str(steps["encoder"] / "1" / "model.onnx")
        # The weights packed ahead are the ones each session would pack for itself: the same vectors, bit for bit.
        made = ragged_requests(tokenizer, GROUPS, [0, 2, 1, 4], np.random.default_rng(2))
        batch = [request({INPUT_IDS: ids, ATTENTION_MASK: mask}, [TOKEN_EMBEDDINGS]) for _, ids, mask in made]
        for shared, own in zip(second.execute(batch), plain.execute(batch)):
            np.testing.assert_array_equal(output(shared, TOKEN_EMBEDDINGS), output(own, TOKEN_EMBEDDINGS))
    finally:
        for step in (plain, first, second):
            step.finalize()


def _save_graph(path: Path, nodes: list, inputs: list, outputs: list, initializers: list) -> Path:
    """A float graph at opset 17, saved to `path`; inputs and outputs: (name, shape)."""

    def values(named: list) -> list:
        return [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape) for name, shape in named]

    graph = onnx.helper.make_graph(nodes, path.stem, values(inputs), values(outputs), initializers)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _tiny_graph(path: Path, scale: float) -> Path:
    """A MatMul on a constant weight large enough to be written to the external data file."""
    weight = onnx.numpy_helper.from_array(np.full((64, 64), scale, dtype=np.float32), "weight")
    node = onnx.helper.make_node("MatMul", ["x", "weight"], ["y"])
    return _save_graph(path, [node], [("x", [None, 64])], [("y", [None, 64])], [weight])


def test_a_new_graph_of_a_model_replaces_its_older_one_and_what_a_killed_writer_left(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBED_PACKED_GRAPHS", str(tmp_path / "packed"))
    encoder = python_backend.step_module("encoder")
    older = encoder.packed_graph(_tiny_graph(tmp_path / "a" / "model.onnx", 1.0), "tiny-encoder", fuse_skip_layer_norm=False)
    left = tmp_path / "packed" / "tiny-encoder" / ".writing-killed"
    left.mkdir()
    newer = encoder.packed_graph(_tiny_graph(tmp_path / "b" / "model.onnx", 2.0), "tiny-encoder", fuse_skip_layer_norm=False)
    assert newer != older
    assert sorted(p.name for p in newer.parent.parent.iterdir()) == sorted([".lock", newer.parent.name])
    x = np.ones((1, 64), dtype=np.float32)
    (y,) = ort.InferenceSession(str(newer), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y, np.full((1, 64), 128.0, dtype=np.float32))


def _residual_layer_norm(path: Path) -> Path:
    """Add(x, skip) then LayerNormalization: the pattern onnxruntime fuses into one SkipLayerNormalization."""
    shape = ["rows", "tokens", 64]
    nodes = [
        onnx.helper.make_node("Add", ["x", "skip"], ["sum"]),
        onnx.helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12),
    ]
    scale_and_shift = [
        onnx.numpy_helper.from_array(np.linspace(0.5, 2.0, 64, dtype=np.float32), "gamma"),
        onnx.numpy_helper.from_array(np.linspace(-1.0, 1.0, 64, dtype=np.float32), "beta"),
    ]
    return _save_graph(path, nodes, [("x", shape), ("skip", shape)], [("y", shape)], scale_and_shift)


def test_a_packed_graph_keeps_a_residual_add_and_its_layer_norm_apart_unless_the_export_fuses_them(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBED_PACKED_GRAPHS", str(tmp_path / "packed"))
    encoder = python_backend.step_module("encoder")
    source = _residual_layer_norm(tmp_path / "model.onnx")
    rng = np.random.default_rng(3)
    x, skip = (rng.normal(size=(2, 5, 64)).astype(np.float32) for _ in range(2))
    total = x + skip
    expected = (total - total.mean(-1, keepdims=True)) / np.sqrt(total.var(-1, keepdims=True) + 1e-12)
    expected = expected * np.linspace(0.5, 2.0, 64) + np.linspace(-1.0, 1.0, 64)
    graphs = {}
    for fuse, operators in [(False, ["Add", "LayerNormalization"]), (True, ["SkipLayerNormalization"])]:
        graphs[fuse] = encoder.packed_graph(source, "residual", fuse_skip_layer_norm=fuse)
        assert [node.op_type for node in onnx.load(str(graphs[fuse]), load_external_data=False).graph.node] == operators
        (y,) = ort.InferenceSession(str(graphs[fuse]), providers=["CPUExecutionProvider"]).run(None, {"x": x, "skip": skip})
        np.testing.assert_allclose(y, expected, atol=1e-5)
    # Each setting is a graph of its own: a cache written with one is not served for the other.
    assert graphs[False].parent != graphs[True].parent


def test_an_encoder_that_cannot_write_its_packed_graph_serves_the_exported_one_and_says_why(steps, tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("EMBED_PACKED_GRAPHS", str(blocked))
    (tmp_path / "locks").mkdir()
    step = load_step("encoder", steps["encoder"], tmp_path / "locks", shared_weights="1")
    try:
        assert step.sessions.alone._model_path == str(steps["encoder"] / "1" / "model.onnx")
        assert any("weights per session" in r.getMessage() and str(blocked) in r.getMessage() for r in caplog.records)
    finally:
        step.finalize()


def test_the_controlled_encoder_gathers_each_rows_factors_and_mode_with_its_ids(steps, tokenizer, tmp_path):
    step = load_step(
        "encoder", steps["controlled-encoder"], tmp_path, slice_rows="2", intra_op_threads="1", alone_intra_op_threads="1"
    )
    reference = ort.InferenceSession(str(steps["controlled-encoder"] / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    made = ragged_requests(tokenizer, [TEXTS[0:3], TEXTS[3:5]], [2, 0], rng)
    requests, expected_rows = [], []
    for number, (sequences, ids, mask) in enumerate(made):
        factors = np.where(mask == 1, rng.uniform(0.2, 3.0, size=ids.shape), 9.0).astype(np.float32)
        modes = np.array([[number == 0]] * len(sequences))  # log-additive in one request, multiplicative in the other
        requests.append(
            request(
                {INPUT_IDS: ids, ATTENTION_MASK: mask, CONTROL_FACTORS: factors, CONTROL_LOG_ADDITIVE: modes}, [TOKEN_EMBEDDINGS]
            )
        )
        for row, sequence in enumerate(sequences):
            controls = {CONTROL_FACTORS: factors[row : row + 1, : len(sequence)], CONTROL_LOG_ADDITIVE: modes[row : row + 1]}
            expected_rows.append(alone(reference, sequence, controls)[TOKEN_EMBEDDINGS])
    answered = [row for response in step.execute(requests) for row in output(response, TOKEN_EMBEDDINGS)]
    step.sessions.siblings.own.close()
    for row, expected in zip(answered, expected_rows):
        np.testing.assert_allclose(row[: len(expected)], expected, atol=2e-4, rtol=1e-3)
    # The controls matter: the same row without them is another vector.
    sequence = made[0][0][0]
    plain = alone(
        reference, sequence, {CONTROL_FACTORS: np.ones((1, len(sequence)), np.float32), CONTROL_LOG_ADDITIVE: np.array([[True]])}
    )
    assert not np.allclose(plain[TOKEN_EMBEDDINGS], expected_rows[0], atol=1e-3)


# -- the steps after the encoder ------------------------------------------------------------------------------------


def test_the_pooling_step_mean_pools_real_tokens_and_normalizes(steps, manifest):
    assert (manifest["poolings"], manifest["head"]) == (["mean"], ["Normalize"])  # what the reference below computes
    step = load_step("pooling", steps["pooling"])
    rng = np.random.default_rng(2)
    shapes = [(3, 9), (1, 4), (2, 14)]
    made = []
    for rows, width in shapes:
        tokens = rng.normal(size=(rows, width, 384)).astype(np.float32)
        lengths = rng.integers(1, width + 1, size=rows)
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        made.append((tokens, lengths, mask))
    responses = step.execute([request({TOKEN_EMBEDDINGS: tokens, ATTENTION_MASK: mask}) for tokens, _, mask in made])
    for (tokens, lengths, _), response in zip(made, responses):
        embeddings = output(response, EMBEDDING)
        assert embeddings.shape == (len(lengths), 384) and embeddings.dtype == np.float32
        for row, length in enumerate(lengths):
            mean = tokens[row, :length].mean(axis=0)
            np.testing.assert_allclose(embeddings[row], mean / np.linalg.norm(mean), atol=1e-6)


def test_the_compression_step_projects_each_request_with_the_fitted_matrix(steps, manifest):
    step = load_step("compression", steps["compression"])
    projection = np.load(steps["compression"] / "1" / "projection.npy")
    assert projection.shape == (manifest["compression"]["size"], manifest["dimensions"])
    rng = np.random.default_rng(3)
    inputs = [rng.normal(size=(rows, manifest["dimensions"])).astype(np.float32) for rows in (4, 1, 7)]
    for embeddings, response in zip(inputs, step.execute([request({EMBEDDING: e}) for e in inputs])):
        np.testing.assert_allclose(output(response, EMBEDDING), embeddings @ projection.T, rtol=1e-4, atol=1e-5)


def test_the_layer_pooling_step_pools_every_layer_over_real_tokens_only(steps, manifest):
    step = load_step("layer_pooling", steps["layer-pooling"])
    poolings = manifest["layers"]["poolings"]
    assert step.poolings == poolings
    layers = manifest["num_layers"] + 1
    rng = np.random.default_rng(4)
    made = []
    for rows, width in [(2, 6), (3, 11)]:
        states = rng.normal(size=(rows, layers, width, 8)).astype(np.float32)
        lengths = rng.integers(1, width + 1, size=rows)
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        states[mask[:, None, :, None].repeat(layers, 1).repeat(8, 3) == 0] = 100.0  # padding that must not count
        made.append((states, lengths, mask))
    responses = step.execute([request({HIDDEN_STATES: states, ATTENTION_MASK: mask}) for states, _, mask in made])
    reference = {
        "mean": lambda real: real.mean(axis=0),
        "weighted_mean": lambda real: (
            (real * np.arange(1, len(real) + 1)[:, None]).sum(axis=0) / np.arange(1, len(real) + 1).sum()
        ),
        "max": lambda real: real.max(axis=0),
        "last_token": lambda real: real[-1],
        "abs_max": lambda real: np.abs(real).max(axis=0),
    }
    for (states, lengths, _), response in zip(made, responses):
        pooled = output(response, POOLED)
        assert pooled.shape == (len(lengths), layers, len(poolings), 8)
        for row, length in enumerate(lengths):
            for layer in range(layers):
                real = states[row, layer, :length]
                for column, name in enumerate(poolings):
                    np.testing.assert_allclose(pooled[row, layer, column], reference[name](real), rtol=1e-5, atol=1e-6)


# -- a malformed request fails alone --------------------------------------------------------------------------------


def error_of(response: InferenceResponse) -> str:
    assert response.has_error(), "a malformed request was answered"
    return response.error().message()  # type: ignore[union-attr]


def test_the_encoder_answers_a_malformed_request_with_its_own_error_and_the_rest_as_before(encoder, reference_encoder, tokenizer):
    (sequences, ids, mask), (other_sequences, other_ids, other_mask) = ragged_requests(
        tokenizer, [TEXTS[0:2], TEXTS[2:4]], [2, 0], np.random.default_rng(5)
    )
    mismatched = request({INPUT_IDS: ids, ATTENTION_MASK: mask[:, :-1]}, [TOKEN_EMBEDDINGS])
    outside = request({INPUT_IDS: np.full_like(ids, 10**7), ATTENTION_MASK: mask}, [TOKEN_EMBEDDINGS])
    good = [request({INPUT_IDS: i, ATTENTION_MASK: m}, [TOKEN_EMBEDDINGS]) for i, m in ((ids, mask), (other_ids, other_mask))]
    responses = encoder.execute([good[0], mismatched, outside, good[1]])
    assert error_of(responses[1]).startswith("encoder: ") and error_of(responses[2]).startswith("encoder: ")
    for response, texts in ((responses[0], sequences), (responses[3], other_sequences)):
        tokens = output(response, TOKEN_EMBEDDINGS)
        for row, sequence in enumerate(texts):
            expected = alone(reference_encoder, sequence)[TOKEN_EMBEDDINGS]
            np.testing.assert_allclose(tokens[row, : len(sequence)], expected, atol=2e-4, rtol=1e-3)


def test_the_later_steps_answer_a_malformed_request_with_its_own_error(steps, manifest):
    rng = np.random.default_rng(6)
    dims, layers = manifest["dimensions"], manifest["num_layers"] + 1
    mask = np.ones((2, 5), dtype=np.int64)
    cases = {
        "pooling": ("pooling", "pooling", TOKEN_EMBEDDINGS, (2, 5, dims), (2, 4, dims), EMBEDDING),
        "compression": ("compression", "compression", EMBEDDING, (2, dims), (2, dims - 1), EMBEDDING),
        "layer pooling": ("layer_pooling", "layer-pooling", HIDDEN_STATES, (2, layers, 5, 8), (2, layers, 4, 8), POOLED),
    }
    for label, (source, role, name, good_shape, bad_shape, output_name) in cases.items():
        step = load_step(source, steps[role])
        extra = {} if name == EMBEDDING else {ATTENTION_MASK: mask}
        good = {name: rng.normal(size=good_shape).astype(np.float32), **extra}
        bad = {name: rng.normal(size=bad_shape).astype(np.float32), **extra}
        responses = step.execute([request(good), request(bad), request(good)])
        assert error_of(responses[1]).startswith(f"{label}: "), label
        np.testing.assert_array_equal(output(responses[0], output_name), output(responses[2], output_name))
        assert output(responses[0], output_name).shape[0] == 2


# -- the whole text pipeline, step after step ------------------------------------------------------------------------


def forward(response: InferenceResponse, names: list[str], requested: list[str] | None = None) -> InferenceRequest:
    """The next step's request from a step's response, as the ensemble wires them."""
    return request({name: output(response, name) for name in names}, requested)


def test_the_text_pipeline_step_by_step_matches_onnxruntime_and_numpy_one_text_at_a_time(
    steps, encoder, reference_encoder, tokenizer
) -> None:
    tokenize = load_step("tokenizer", steps["tokenizer"])
    pool = load_step("pooling", steps["pooling"])
    compress = load_step("compression", steps["compression"])
    projection = np.load(steps["compression"] / "1" / "projection.npy")
    groups = [TEXTS[:4], TEXTS[4:]]
    tokenized = tokenize.execute([request({TEXT: text_tensor(texts)}) for texts in groups])
    encoded = encoder.execute([forward(r, [INPUT_IDS, ATTENTION_MASK], [TOKEN_EMBEDDINGS]) for r in tokenized])
    pooled = pool.execute(
        [
            request({TOKEN_EMBEDDINGS: output(e, TOKEN_EMBEDDINGS), ATTENTION_MASK: output(t, ATTENTION_MASK)})
            for e, t in zip(encoded, tokenized)
        ]
    )
    compressed = compress.execute([forward(p, [EMBEDDING]) for p in pooled])
    embeddings = np.concatenate([output(p, EMBEDDING) for p in pooled])
    small = np.concatenate([output(c, EMBEDDING) for c in compressed])
    for index, text in enumerate(TEXTS):
        mean = alone(reference_encoder, tokenizer.encode(text).ids)[TOKEN_EMBEDDINGS].mean(axis=0)
        expected = mean / np.linalg.norm(mean)
        np.testing.assert_allclose(embeddings[index], expected, atol=1e-5)
        np.testing.assert_allclose(small[index], projection @ expected, atol=1e-5)
    # Distinct texts, distinct vectors: a row answered for the wrong text could not pass the checks above.
    assert np.abs(embeddings @ embeddings.T - np.eye(len(TEXTS))).max() < 0.999


def test_every_step_source_is_covered_here():
    """A step added to export/steps/ gets its tests here too (sentence_head is the pooling step's, and the export's;
    image_processing the image-preprocess step's). The image pipeline's steps are tested in tests/test_image_steps.py."""
    sources = {path.stem for path in STEPS.glob("*.py")} - {"__init__", "sentence_head", "image_processing"}
    assert sources == {"tokenizer", "encoder", "pooling", "compression", "layer_pooling", "image_preprocess", "vision_encoder"}


def test_the_export_puts_the_tensor_names_next_to_every_python_step(steps):
    """Inside Triton each step imports tensors.py from beside its model.py; here the steps found it in repository_contract/."""
    python_steps = {role: directory / "1" for role, directory in steps.items() if (directory / "1" / "model.py").exists()}
    assert python_steps
    for role, version_dir in python_steps.items():
        assert (version_dir / "tensors.py").read_bytes() == Path(tensors.__file__).read_bytes(), role
