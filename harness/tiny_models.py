"""A tiny CLIP-style dual encoder with random weights, built locally, for the image pipeline's tests and bench.

Weights cannot be downloaded here, so the model is built from transformers' own CLIPConfig, CLIPImageProcessor and a
CLIPTokenizerFast trained on the STS sentences, and saved as an ordinary sentence-transformers directory in either of
the layouts sentence-transformers loads: the legacy `CLIPModel` module, or a `Transformer` module whose processor takes
both texts and images. Its `encode()` takes strings and PIL images alike. A large initializer_range keeps the random
model sensitive to its input, so that a wrong crop, resize or normalization shows as a different vector.

    python -m harness.tiny_models OUT_DIR [transformer|legacy]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from export.datasets import sts_sentences

INIT_RANGE = 0.3
# More than 128 dimensions, so that compress_to_size=128 is a real projection.
PROJECTION = 160
IMAGE_SIZE, PATCH = 32, 8
VISION_HIDDEN, VISION_LAYERS = 48, 3
# CLIP's own: shortest edge resized to the square's side, bicubic (PIL's 3), then center-cropped; OpenAI's mean/std.
PROCESSOR = {
    "do_resize": True,
    "size": {"shortest_edge": IMAGE_SIZE},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}
LAYOUTS = ("transformer", "legacy")
START, END = "<|startoftext|>", "<|endoftext|>"


def _clip_tokenizer():
    """A CLIP-shaped byte-level BPE (lower-cased, `</w>` word ends, framed by start and end of text, padded with the
    end token as OpenAI's CLIP is) trained on the STS sentences."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import CLIPTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=END, end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), "removed", invert=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=[START, END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
    )
    tokenizer.train_from_iterator(sts_sentences(), trainer)
    tokenizer.post_processor = processors.RobertaProcessing(
        sep=(END, tokenizer.token_to_id(END)),
        cls=(START, tokenizer.token_to_id(START)),
        add_prefix_space=False,
        trim_offsets=False,
    )
    return CLIPTokenizerFast(
        tokenizer_object=tokenizer, bos_token=START, eos_token=END, unk_token=END, pad_token=END, model_max_length=77
    )


def _clip_model(tokenizer):
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    # Another width and depth than the text tower's, so that a vision layer or width taken for a text one shows.
    vision = {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 2 * VISION_HIDDEN,
        "num_hidden_layers": VISION_LAYERS,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION, initializer_range=INIT_RANGE)
    config.text_config.initializer_range = config.vision_config.initializer_range = INIT_RANGE
    return CLIPModel(config).eval()


def build_tiny_clip(directory: Path, layout: str = "transformer") -> Path:
    """Writes the model into `directory` (created) and returns it; `layout` is one of LAYOUTS."""
    from sentence_transformers import SentenceTransformer
    from transformers import CLIPImageProcessor, CLIPProcessor

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: one of {LAYOUTS}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _clip_tokenizer()
    _clip_model(tokenizer).save_pretrained(str(directory))
    CLIPProcessor(image_processor=CLIPImageProcessor(**PROCESSOR), tokenizer=tokenizer).save_pretrained(str(directory))
    if layout == "legacy":
        # What sentence-transformers 2.x wrote for clip-ViT-B-32: one CLIPModel module at the directory's root.
        module = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.CLIPModel"}
        (directory / "modules.json").write_text(json.dumps([module], indent=2) + "\n")
        return directory
    from sentence_transformers.base.modules import Transformer

    SentenceTransformer(modules=[Transformer(str(directory))], device="cpu").save(str(directory))
    return directory


if __name__ == "__main__":
    print(build_tiny_clip(Path(sys.argv[1]), *sys.argv[2:]))
