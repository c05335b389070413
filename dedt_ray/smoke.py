"""Config overrides for smoke runs that take seconds on a CPU (tests and benchmarks share them).

load_config(None, [*SMOKE_MODEL, *SMOKE_EVALUATE, "data.limit=150"])
"""

SMOKE_MODEL = [  # an 8 px UNet of two small blocks without attention, one 1-thread worker
    "data.image_size=8",
    "model.block_out_channels=[8,16]",
    "model.norm_num_groups=4",
    "model.attention_head_dim=4",
    "model.mid_attention=false",
    "model.attention_levels=[false,false]",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.threads_per_worker=1",
    "train.num_workers=1",
]
# the same tiny UNet as `model.*` fields, for tests that build models directly
SMOKE_UNET = {"block_out_channels": [8, 16], "norm_num_groups": 4, "attention_head_dim": 4}
SMOKE_EVALUATE = [  # no DRO; a few samples scored by a one-epoch classifier
    "reweight.enabled=false",
    "evaluate.samples_per_class=2",
    "evaluate.num_inference_steps=2",
    "evaluate.feature_space=classifier",
    "evaluate.classifier_epochs=1",
    "evaluate.classifier_max_images=150",
    "evaluate.max_real=100",
    "evaluate.manifold_samples=20",
    "evaluate.batch_size=64",
]
