"""Tiny, randomly initialised real backbones saved to disk and tiny datasets in their real formats."""
from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_OPENCLIP = "qshift-tiny-vit"
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "pink", "brown")


def tiny_openclip_checkpoint(folder: Path) -> str:
    """Register a tiny open_clip architecture and save a random checkpoint of it; returns its path."""
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / f"{TINY_OPENCLIP}.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_OPENCLIP)
    ckpt = folder / "tiny_openclip.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return str(ckpt)


#: every word the fixture datasets and the retrieval test write; the tiny tokenizers know each as one token
FIXTURE_WORDS = ("a", "the", "on", "in", "of", "and", "mat", "dog", "cat", "bird", "fish", "horse", "person",
                 "someone", "walking", "thing", "number", "black", "wool", "coat", "style", "photo", "sofa", "box",
                 "grass", "table", "tree") + COLOURS
PUNCTUATION = ".,!?'-#"


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair of lowest rank (as CLIP's BPE does)."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        first, second = symbols[i], symbols[i + 1]
        merged, j = [], 0
        while j < len(symbols):
            if j + 1 < len(symbols) and symbols[j] == first and symbols[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary in CLIP's format: every character (inside and at the end of a word) and,
    through merges, every fixture word as one token; unseen words still encode, character by character.

    Each word's merges join the pieces the merges so far leave of it, left to right; being ranked after all
    earlier merges, they cannot change how an earlier word is encoded."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + PUNCTUATION:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(FIXTURE_WORDS):
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return vocab, list(ranks)


def _bert_vocab() -> dict[str, int]:
    """A WordPiece vocabulary in BERT's format: the special tokens, every fixture word, and every character
    both word-initial and as a ``##`` continuation (so no word of ASCII letters and digits becomes [UNK])."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FIXTURE_WORDS]
    words += list(string.ascii_lowercase + string.digits + PUNCTUATION)
    words += ["##" + ch for ch in string.ascii_lowercase + string.digits]
    return {w: i for i, w in enumerate(dict.fromkeys(words))}


def tiny_hf_clip(folder: Path) -> Path:
    """A tiny transformers CLIPModel + tokenizer + image processor, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=32, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def tiny_hf_blip(folder: Path) -> Path:
    """A tiny transformers BlipForImageTextRetrieval + BERT tokenizer + image processor.

    Random, but each item gets its own embedding: BLIP initialises its vision tower at 1e-10 (every image's
    embedding the same, pairwise cosine 0.99999994) and at BERT's 0.02 a two-layer text tower's [CLS] output
    barely depends on the words (cosine 0.999998); at 0.2 (vision) and 0.5 (text) the largest pairwise cosine
    of eight distinct fixture images / captions is about 0.95 / 0.93."""
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizer(vocab=_bert_vocab())
    cfg = BlipConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=40, encoder_hidden_size=32,
                                      pad_token_id=0, bos_token_id=2, sep_token_id=3, initializer_range=0.5),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8, initializer_range=0.2),
                     projection_dim=16, image_text_hidden_size=16)
    torch.manual_seed(0)
    BlipForImageTextRetrieval(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def retrieval_pairs(n: int = 8, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` distinct random images [n, 40, 40, 3] (uint8) and ``n`` distinct captions of fixture words."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, 40, 40, 3), dtype=np.uint8)
    animals, things = ("dog", "cat", "bird", "fish", "horse"), ("mat", "sofa", "box", "grass", "table", "tree")
    captions = [f"a {COLOURS[i % len(COLOURS)]} {animals[i % len(animals)]} on the {things[i % len(things)]}"
                for i in range(n)]
    assert len(set(captions)) == n, "increase the word lists for more pairs"
    return images, captions


def tiny_karpathy(root: Path, name: str = "coco", n_images: int = 6, captions_as_list: bool = True) -> Path:
    """A few generated JPEGs and a Karpathy-format annotation file (as BLIP/ALBEF ship them)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n_images):
        arr = rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)
        rel = f"images/img_{i:03d}.jpg"
        Image.fromarray(arr).save(root / rel, quality=90)
        caps = [f"A {COLOURS[i % 8]} dog, on the mat #{k}!" for k in range(6 if name == "coco" else 5)]
        entries.append({"image": rel, "caption": caps if captions_as_list else caps[0]})
    fname = "coco_karpathy_test.json" if name == "coco" else "flickr30k_test.json"
    (root / fname).write_text(json.dumps(entries))
    return root


def tiny_pedes(root: Path, fname: str = "reid_raw.json") -> Path:
    """Person re-id format: several images per person id, two captions each, a test split."""
    rng = np.random.default_rng(1)
    (root / "imgs" / "test").mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(6):
        rel = f"test/p{k // 2}_{k % 2}.jpg"
        Image.fromarray(rng.integers(0, 255, (48, 24, 3), dtype=np.uint8)).save(root / "imgs" / rel)
        entries.append({"id": k // 2, "file_path": rel, "split": "test",
                        "captions": [f"A person {k // 2} in red.", f"Someone {k // 2} walking."]})
    entries.append({"id": 99, "file_path": "train/x.jpg", "split": "train", "captions": ["unused"]})
    (root / fname).write_text(json.dumps(entries))
    return root


def tiny_nocaps(root: Path) -> Path:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    domains = ["in-domain", "near-domain", "out-domain", "out-domain"]
    images, anns = [], []
    for k, d in enumerate(domains):
        name = f"{k:04d}.jpg"
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(root / name)
        images.append({"id": 100 + k, "file_name": name, "domain": d})
        anns += [{"image_id": 100 + k, "caption": f"Thing {k} number {j}."} for j in range(3)]
    (root / "nocaps_val_4500_captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def tiny_fashiongen(root: Path) -> Path:
    """The Fashion-Gen HDF5 layout: images, descriptions and product ids (two images per product)."""
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    with h5py.File(root / "fashiongen_256_256_validation.h5", "w") as f:
        f["input_image"] = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
        f["input_description"] = np.array([[f"Black wool coat, style {k // 2}.".encode("latin-1")] for k in range(4)])
        f["input_productID"] = np.array([[str(500 + k // 2).encode()] for k in range(4)])
    return root
