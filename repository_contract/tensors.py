"""The names of the tensors that the Triton models of an export take and answer.

One vocabulary for everything that speaks to those models: the export, which writes the names into every
config.pbtxt; the Triton Python steps, which read and answer them; the gateway, bench and the tests, which send
and read them. A name spelt out in one of them could drift from the others unseen until Triton refuses a request.

It imports nothing: the export copies this file next to every step's model.py, and Triton's Python backend runs the
step where this repository is not importable.

Shapes leave out the batch dimension, as Triton's configs do; -1 is the sequence (padded to a request's longest row).
"""

# The ensembles' inputs.
TEXT = "TEXT"  # [1] BYTES: one UTF-8 text per row (text ensembles)
TOKEN_IDS = "TOKEN_IDS"  # [-1] INT64: one prompt's token ids per row, right-padded with ID_PADDING (token-id ensembles)
# [-1] FP32: an attention factor per token, 1 = uncontrolled (controlled ensembles); between the steps of a controlled
# image ensemble, [image tokens]: the class token's (always 1), then each patch's in row-major order
CONTROL_FACTORS = "CONTROL_FACTORS"
CONTROL_LOG_ADDITIVE = "CONTROL_LOG_ADDITIVE"  # [1] BOOL: per row, true: log-additive controls, false: multiplicative
IMAGE = "IMAGE"  # [1] BYTES: one encoded image file per row (image ensembles); decoded in the image-preprocess step
# [3] INT64: per row x, y, size in pixels of a square crop of the image as decoded (after EXIF orientation), or
# NO_CROP: the model's own resize and center crop only (image ensembles).
IMAGE_CROP = "IMAGE_CROP"
NO_CROP = (-1, -1, -1)
# [-1, 6] FP32: per row the attention controls on its image (controlled image ensembles), one per line: the rectangle's
# left, top, width and height as fractions of the whole image as decoded (after EXIF orientation, before any crop), the
# factor, and 1 for token_overlap "complete" or 0 for "partial" (IMAGE_CONTROL_FIELDS). Rows with fewer controls than
# others are padded with NO_CONTROL: a rectangle of no area with factor 1, which changes nothing.
IMAGE_CONTROLS = "IMAGE_CONTROLS"
IMAGE_CONTROL_FIELDS = ("left", "top", "width", "height", "factor", "complete")
NO_CONTROL = (0.0, 0.0, 0.0, 0.0, 1.0, 0.0)

# What pads TOKEN_IDS rows of different lengths sent in one request: never a token id (the gateway refuses negative
# ones), so the token-id steps drop it before framing.
ID_PADDING = -1

# Between the steps.
INPUT_IDS = "INPUT_IDS"  # [-1] INT64: token ids framed by the special tokens, padded with the model's pad id
# [-1] INT64: 1 at real tokens, 0 at padding; for an image, [image tokens] of 1 (the image-preprocess step's)
ATTENTION_MASK = "ATTENTION_MASK"
TOKEN_EMBEDDINGS = "TOKEN_EMBEDDINGS"  # [-1, hidden] FP32: the last layer's output per token
# [layers + 1, -1, hidden] FP32: the word embeddings and every layer's output per token; for an image, the vision
# tower's [layers + 1, image tokens, hidden]: its embeddings after the pre-layernorm, then every layer's output
HIDDEN_STATES = "HIDDEN_STATES"
PIXEL_VALUES = "PIXEL_VALUES"  # [3, size, size] FP32: an image resized, cropped and normalized as the model's processor does

# The ensembles' outputs.
EMBEDDING = "EMBEDDING"  # [dimensions] FP32, or [compressed size] from the compression ensembles: the sentence vector
# [layers + 1, poolings, hidden] FP32: every pooling of every layer (layers ensembles; the image layers ensemble's
# with the vision tower's layers and width)
POOLED = "POOLED"
# [1] INT32: the text's tokens with the special ones, counted before truncation; for an image, the model's image tokens
TOKEN_COUNT = "TOKEN_COUNT"


def onnx_name(name: str) -> str:
    """The encoder graph's name for one of the tensors above: the exported ONNX names its tensors in lower case, and
    on GPU targets Triton's onnxruntime and TensorRT backends bind the encoder's inputs and outputs by those names."""
    return name.lower()
