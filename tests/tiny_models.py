"""Tiny sentence-transformers models with random weights, built locally, for the model families the export serves.

Weights cannot be downloaded here, so each family is covered by a small model built through its real
`transformers` config and real `sentence_transformers` modules and saved as an ordinary sentence-transformers
directory: the export and serving code paths are the ones a downloaded model takes. A large
initializer_range keeps random models sensitive to their input, so that a wrong prompt, pooling or head
shows as a different vector.

    python -m tests.tiny_models OUT_DIR     # writes every model under OUT_DIR and prints their paths
"""

from __future__ import annotations

import sys
from pathlib import Path

from export.datasets import sts_sentences
from export.source_model import default_model_path

INIT_RANGE = 0.3
# More than 128 dimensions everywhere, so that compress_to_size=128 is a real projection for each.
HIDDEN = 192
# Fewer than 128: a model served without compress_to_size.
NARROW = 64

QWEN_QUERY_INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


def _minilm_tokenizer(out: Path, model_input_names: list[str]) -> None:
    """The packaged all-MiniLM tokenizer, saved in `out` for a model whose forward takes `model_input_names`."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(default_model_path()), model_input_names=model_input_names).save_pretrained(str(out))


def _save(modules: list, out: Path, prompts: dict[str, str], default_prompt_name: str | None = None) -> Path:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(modules=modules, device="cpu", prompts=prompts, default_prompt_name=default_prompt_name)
    model.save(str(out))
    return out


def _transformer(out: Path, config, max_seq_length: int):
    """The ST Transformer module around a randomly initialised model of `config`, saved with the tokenizer in `out`."""
    import torch
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(str(out))
    return models.Transformer(str(out), max_seq_length=max_seq_length)


def bert_cls_dense(out: Path) -> Path:
    """BERT (it takes token_type_ids) with CLS pooling, a Dense tanh head, Normalize, and query/document prompts."""
    from sentence_transformers.sentence_transformer import modules as models
    from torch import nn
    from transformers import BertConfig

    out.mkdir(parents=True, exist_ok=True)
    _minilm_tokenizer(out, ["input_ids", "token_type_ids", "attention_mask"])
    config = BertConfig(
        vocab_size=30522,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=384,
        type_vocab_size=2,
        max_position_embeddings=512,
        initializer_range=INIT_RANGE,
    )
    transformer = _transformer(out, config, max_seq_length=256)
    pooling = models.Pooling(HIDDEN, pooling_mode="cls")
    dense = models.Dense(HIDDEN, 160, activation_function=nn.Tanh())
    return _save([transformer, pooling, dense, models.Normalize()], out, {"query": "query: ", "document": "passage: "})


def bert_narrow_mean(out: Path) -> Path:
    """A BERT of NARROW dimensions with mean pooling and no head: fewer than compress_to_size's 128, so it is
    served without compression. Not in BUILDERS, which are the families served with every option."""
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import BertConfig

    out.mkdir(parents=True, exist_ok=True)
    _minilm_tokenizer(out, ["input_ids", "token_type_ids", "attention_mask"])
    config = BertConfig(
        vocab_size=30522,
        hidden_size=NARROW,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * NARROW,
        max_position_embeddings=512,
        initializer_range=INIT_RANGE,
    )
    transformer = _transformer(out, config, max_seq_length=256)
    return _save([transformer, models.Pooling(NARROW, pooling_mode="mean"), models.Normalize()], out, {})


def distilbert_max_two_dense(out: Path) -> Path:
    """DistilBERT (no token_type_ids) with max pooling, two Dense layers (ReLU, then identity), a shorter maximum
    sequence length, and a default prompt that the OpenAI contract applies."""
    from sentence_transformers.sentence_transformer import modules as models
    from torch import nn
    from transformers import DistilBertConfig

    out.mkdir(parents=True, exist_ok=True)
    _minilm_tokenizer(out, ["input_ids", "attention_mask"])
    config = DistilBertConfig(vocab_size=30522, dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=384, initializer_range=INIT_RANGE)
    transformer = _transformer(out, config, max_seq_length=128)
    pooling = models.Pooling(HIDDEN, pooling_mode="max")
    dense = [models.Dense(HIDDEN, 256, activation_function=nn.ReLU()), models.Dense(256, 144, activation_function=nn.Identity())]
    prompts = {"search_query": "search_query: ", "search_document": "search_document: ", "clustering": "clustering: "}
    return _save([transformer, pooling, *dense], out, prompts, default_prompt_name="clustering")


def _byte_level_bpe(out: Path):
    """A Qwen-style byte-level BPE tokenizer trained on the STS sentences, appending <|endoftext|> to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sts_sentences(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.token_to_id(eos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=eos, padding_side="left")
    fast.save_pretrained(str(out))
    return fast


def qwen3_last_token(out: Path) -> Path:
    """A Qwen3-style decoder: last-token pooling on the appended end-of-sequence token, Normalize, and an
    instruction prompt for queries only, as Qwen3-Embedding declares."""
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import Qwen3Config

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_level_bpe(out)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=48,
        max_position_embeddings=1024,
        initializer_range=INIT_RANGE,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformer = _transformer(out, config, max_seq_length=512)
    pooling = models.Pooling(HIDDEN, pooling_mode="lasttoken")
    return _save([transformer, pooling, models.Normalize()], out, {"query": QWEN_QUERY_INSTRUCTION, "document": ""})


BUILDERS = {"tiny-bert-cls": bert_cls_dense, "tiny-distilbert-max": distilbert_max_two_dense, "tiny-qwen3": qwen3_last_token}


def build_all(root: Path) -> dict[str, Path]:
    return {name: build(root / name) for name, build in BUILDERS.items()}


if __name__ == "__main__":
    for name, path in build_all(Path(sys.argv[1])).items():
        print(name, path)
