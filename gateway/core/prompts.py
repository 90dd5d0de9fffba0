"""Prompts made of items (text, token ids, images), resolved to one model input.

Transport-neutral: the Aleph Alpha HTTP contract and the gRPC contract both turn their own prompt
shapes into PromptItems. A prompt that is a single text goes to the ensemble's own tokenizer step,
so it embeds exactly like the same text sent to /v1/embeddings; anything else is tokenized here,
item by item, and concatenated in order into one token id sequence. A prompt with attention controls
is always tokenized here, since its controls are resolved through the tokenizer's offsets.

A prompt that is a single image goes to the model's image ensemble, for a model that sees images. An image cannot
share a prompt with other items: a dual encoder (CLIP) embeds texts and images with two towers into one space, and
has no sequence that holds both.

Every tokenization on a request path goes through encode() and decode() below, never through the tokenizer's own
encode/decode: those hold the GIL for as long as they run (seconds for a few megabytes), and a worker thread holding
it stops the event loop and every other request with it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tokenizers import Encoding, Tokenizer

from gateway.core import images
from gateway.core.controls import Control, ImageControl, PositionControl, TextControl, TokenControl, check, span_positions
from gateway.core.errors import invalid
from gateway.core.images import ImageInput
from repository_contract.manifest import Vision


@dataclass(frozen=True)
class PromptItem:
    """One item of a prompt, as the transports build it: a "text" item holds a str and text controls, a "token_ids"
    item a list of ids and token controls, an "image" item an ImageInput and image controls."""

    kind: str  # "text", "token_ids" or "image"
    data: str | list[int] | ImageInput
    controls: tuple[Control, ...] = ()

    def length(self) -> int:
        """A text item's characters, a token_ids item's ids."""
        assert not isinstance(self.data, ImageInput)  # image items are resolved apart (_image_prompt)
        return len(self.data)

    def as_text(self) -> tuple[str, list[TextControl]]:
        """A "text" item's text and controls."""
        controls = [c for c in self.controls if isinstance(c, TextControl)]
        assert isinstance(self.data, str) and len(controls) == len(self.controls)
        return self.data, controls

    def as_token_ids(self) -> tuple[list[int], list[TokenControl]]:
        """A "token_ids" item's ids and controls."""
        controls = [c for c in self.controls if isinstance(c, TokenControl)]
        assert isinstance(self.data, list) and len(controls) == len(self.controls)
        return self.data, controls


@dataclass(frozen=True)
class Prompt:
    """What the model is fed: exactly one of a text, a token id sequence (without special tokens) or an image.

    controls is None for an uncontrolled prompt; otherwise token_ids is set and the controls name its positions.
    """

    text: str | None = None
    token_ids: list[int] | None = None
    controls: tuple[PositionControl, ...] | None = None
    image: ImageInput | None = None


def encode(tokenizer: Tokenizer, text: str) -> Encoding:
    """The text's encoding, without special tokens. encode_batch releases the GIL while it tokenizes; encode does not."""
    (encoding,) = tokenizer.encode_batch([text], add_special_tokens=False)
    return encoding


def decode(tokenizer: Tokenizer, token_ids: list[int]) -> str:
    """The text of token ids, special tokens skipped. decode_batch releases the GIL while it decodes; decode does not."""
    (text,) = tokenizer.decode_batch([token_ids])
    return text


def check_length(length: int, max_chars: int, where: str, field: str) -> None:
    """Refuses a text of `length` characters over max_chars before it is tokenized: tokenizing costs about a
    microsecond of CPU per character, and a model reads no more than max_chars of a prompt anyway."""
    if length > max_chars:
        raise invalid(f"'{where}' holds {length} characters, more than the model can read ({max_chars})", field)


def resolve(
    items: list[PromptItem],
    tokenizer: Tokenizer,
    prefix: str,
    field: str,
    index: int | None = None,
    max_chars: int | None = None,
    vision: Vision | None = None,
) -> Prompt:
    """One Prompt from a prompt's items, with the representation's prefix in front (not in front of an image).

    Errors name `field` as the parameter and `field[index]` in the message when the prompt is one of many.
    A prompt tokenized here whose texts (prefix included) hold more than max_chars characters is refused first.
    """
    where = field if index is None else f"{field}[{index}]"
    if not items:
        raise invalid(f"'{where}' must not be empty", field)
    if any(item.kind == "image" for item in items):
        return _image_prompt(items, vision, where, field)
    for item in items:
        for control in item.controls:
            check(control, item.length(), where, f"{field}.controls")
    controlled = any(item.controls for item in items)
    single_text = len(items) == 1 and items[0].kind == "text"
    if single_text and not items[0].data:
        raise invalid(f"'{where}' must not be empty", field)
    if single_text and not controlled:
        text, _ = items[0].as_text()
        return Prompt(text=prefix + text)
    if max_chars is not None:
        # Tokenized here: refuse what no tokenizer should spend seconds on. The items are one model input, so their
        # texts count together (one by one, a prompt of many items could still hold megabytes).
        check_length(len(prefix) + sum(item.length() for item in items if item.kind == "text"), max_chars, where, field)
    if single_text:
        # Tokenized with its prefix as one string, as the uncontrolled text is, so a factor of 1 changes nothing.
        text, text_controls = items[0].as_text()
        encoding = encode(tokenizer, prefix + text)
        positions = tuple(PositionControl(tuple(span_positions(encoding, c, len(prefix))), c.factor) for c in text_controls)
        return Prompt(token_ids=encoding.ids, controls=positions)
    vocab = tokenizer.get_vocab_size()
    ids: list[int] = encode(tokenizer, prefix).ids if prefix else []
    controls: list[PositionControl] = []
    for item in items:
        if item.kind == "text":
            text, text_controls = item.as_text()
            encoding = encode(tokenizer, text)
            for c in text_controls:
                controls.append(PositionControl(tuple(len(ids) + p for p in span_positions(encoding, c)), c.factor))
            ids += encoding.ids
            continue
        token_ids, token_controls = item.as_token_ids()
        bad = next((i for i in token_ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise invalid(f"'{where}' holds token id {bad}, outside the vocabulary [0, {vocab})", field)
        controls += [PositionControl((len(ids) + c.index,), c.factor) for c in token_controls]
        ids += token_ids
    if not ids:
        raise invalid(f"'{where}' must not be empty", field)
    return Prompt(token_ids=ids, controls=tuple(controls) if controlled else None)


def _image_prompt(items: list[PromptItem], vision: Vision | None, where: str, field: str) -> Prompt:
    """The prompt of one image item, checked from its header; anything else with an image in it is refused."""
    if vision is None:
        raise invalid(f"'{where}': this model does not accept images", field)
    if len(items) > 1:
        raise invalid(
            f"'{where}' mixes an image with other items; this model embeds a text or an image, each with its own "
            "encoder, so a prompt is one image or text alone",
            field,
        )
    (item,) = items
    assert isinstance(item.data, ImageInput)  # the transports put an ImageInput in every image item
    images.check(item.data, vision, where, field)
    controls = tuple(c for c in item.controls if isinstance(c, ImageControl))
    if len(controls) != len(item.controls):
        raise invalid(f"'{where}': an image item takes image controls (a rect and a factor)", f"{field}.controls")
    for control in controls:
        check(control, 0, where, f"{field}.controls")
    return Prompt(image=replace(item.data, controls=controls))
