"""The embedded world model's training recipe (:class:`TrainConfig`), what ``qshift train-world-model``
sets; :mod:`qshift.train.world_training` runs it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Training recipe; the defaults reproduce the shipped model v6.1 (v3: steps 2500, typo_p 0.1,
    typo_max_edits 1, noise_std_max None (= 0.12), render_size 96, stem_norm False)."""
    seed: int = 0
    steps: int = 2300
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 150
    pool_size: int = 80_000
    eval_every: int = 500
    hard_negatives: bool = True
    workers: int = 2
    # subword regularisation (like BPE-dropout): each n-gram piece of a word is dropped with this
    # probability at training time, never all pieces of a word
    piece_dropout: float = 0.0
    noise_p: float | None = None  # overrides AUGMENTATIONS["noise_p"] when set
    # overrides the upper end of AUGMENTATIONS["noise_std"] when set: 0.04 is well below ImageNet-C's
    # gaussian_noise severity 1 (0.08); None keeps 0.12 (v3)
    noise_std_max: float | None = 0.04
    # typo regularisation: each caption word is replaced, with this probability, by one of
    # ``typo_variants`` fixed misspellings of it (one random insert / delete / substitute / swap)
    typo_p: float = 0.3
    typo_variants: int = 16
    # each misspelling makes 1..typo_max_edits edits (uniform)
    typo_max_edits: int = 3
    # fine-tuning instead of training from scratch: start from these weights, and train only the
    # named tower ("both", "text" or "image"; the other is frozen and run without gradients)
    init_from: str | None = None
    train_towers: str = "both"
    # overrides the image tower's per-image input standardisation (also of a checkpoint given by
    # init_from); None keeps the model configuration's value
    standardise_input: bool | None = None
    # training scenes are rendered at this size and area-downsampled to the model's input size, as
    # the benchmark's images are (world.RENDER_SIZE); 96 reproduces the v3 weights, rendered at 96 px
    render_size: int = 192
    # from scratch: channel LayerNorms in the image stem (WorldModelConfig.stem_norm); a fine-tune
    # (init_from) keeps its checkpoint's architecture
    stem_norm: bool = True
    # mid-MLP LayerNorms in the image blocks (WorldModelConfig.image_mlp_norm). From scratch: the
    # architecture; with init_from, True inserts them into a checkpoint without them
    # (insert_image_mlp_norms, fitted on clean training scenes); None keeps the default / checkpoint's
    mlp_norm: bool | None = None
    # from scratch: after training, zero the embedding rows of n-gram buckets that no training word (nor
    # any of its typo variants) ever used, so an n-gram the model never saw (e.g. a test-time typo's)
    # adds nothing to its word instead of an untrained random vector; clean captions are unaffected
    zero_unseen_pieces: bool = True
    # low-frequency illumination augmentation: this share of training images is blended with a smooth
    # grey field, (x + a·P) / (1 + a), a ~ U(0, illum_amp_max); fog severity 1 is a = 1.5. Off (0) in v6.1
    illum_p: float = 0.0
    illum_amp_max: float = 0.0
