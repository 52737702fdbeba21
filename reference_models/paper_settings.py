"""The paper's run settings as data: Table 3's cells, Table 4's fusions, Table 2's balancing
hyperparameters, the protocol of appendix B.2, the authors' journal scripts and the newer
methods' own papers' settings. :mod:`reference_models.presets` turns them into the TOML
presets under ``configs/``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "JOURNAL_SETTINGS",
    "METHOD_DEFAULTS",
    "NEWER_SETTINGS",
    "PAPER_SETTINGS",
    "PROTOCOL",
    "TABLE2",
    "TABLE3_COLUMNS",
    "TABLE3_METHODS",
    "TABLE4_FUSIONS",
    "TABLE4_METHODS",
]

TABLE3_COLUMNS: tuple[tuple[str, str], ...] = (
    ("cremad", "resnet18"),
    ("cremad", "conformer"),
    ("ave", "resnet18"),
    ("ucf101", "resnet18"),
)
"""The (dataset, backbone) columns of Table 3."""

TABLE3_METHODS: tuple[str, ...] = (
    "video_only",
    "audio_only",
    "joint",
    "mmcosine",
    "mslr",
    "ogm",
    "pmr",
    "agm",
    "multiloss",
    "mlb",
)
"""The rows of Table 3, in the paper's order."""

TABLE4_FUSIONS: tuple[str, ...] = ("mlp", "film", "gated", "tf")
TABLE4_METHODS: tuple[str, ...] = ("joint", "agm", "multiloss", "mlb")

PROTOCOL: dict[str, Any] = {"max_epochs": 1500, "patience": 300, "schedule": "step"}
"""Appendix B.2: at most 1,500 epochs, early stopping after 300, the official step schedule."""

PAPER_SETTINGS: dict[tuple[str, str], dict[str, Any]] = {
    ("cremad", "resnet18"): {
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "batch_size": 32,
        "warmup_steps": 780,
    },
    ("cremad", "conformer"): {
        "lr": 5e-5,
        "weight_decay": 1e-5,
        "batch_size": 8,
        "warmup_steps": 780,
    },
    ("ave", "resnet18"): {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 32, "warmup_steps": 1500},
    ("ucf101", "resnet18"): {
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "batch_size": 32,
        "warmup_steps": 780,
    },
}
"""Appendix B.2 per (dataset, backbone): (lr, weight decay) (1e-3, 1e-4) for ResNet and
(5e-5, 1e-5) for Conformer, batch 32 / 8; warm-up steps of the official configs."""

# Table 2: balancing hyperparameters, per (method, fusion) and (dataset, backbone).
_C_R, _C_C, _A_R, _U_R = TABLE3_COLUMNS
TABLE2: dict[tuple[str, str], dict[tuple[str, str], dict[str, Any]]] = {
    ("mslr", "linear"): {
        _C_R: {"initial": [0.7, 1.3], "memory_epochs": 20},
        _C_C: {"initial": [0.9, 1.1], "memory_epochs": 20},
        _A_R: {"initial": [0.7, 1.3], "memory_epochs": 10},
        _U_R: {"initial": [1.0, 1.0], "memory_epochs": 5},
    },
    ("mmcosine", "linear"): {
        _C_R: {"scale": 10.0},
        _C_C: {"scale": 10.0},
        _A_R: {"scale": 8.0},
        _U_R: {"scale": 15.0},
    },
    ("ogm", "linear"): {
        _C_R: {"alpha": 1.0},
        _C_C: {"alpha": 1.0},
        _A_R: {"alpha": 0.8},
        _U_R: {"alpha": 1.0},
    },
    ("pmr", "linear"): {
        _C_R: {"alpha": 2.0},
        _C_C: {"alpha": 1.0},
        _A_R: {"alpha": 1.5},
        _U_R: {"alpha": 1.0},
    },
    ("pmr", "mlp"): {_C_C: {"alpha": 0.5}},
    ("agm", "linear"): {
        _C_R: {"alpha": 3.0},
        _C_C: {"alpha": 3.0},
        _A_R: {"alpha": 1.0},
        _U_R: {"alpha": 1.5},
    },
    ("agm", "mlp"): {
        _C_R: {"alpha": 1.0},
        _C_C: {"alpha": 3.0},
        _A_R: {"alpha": 2.0},
        _U_R: {"alpha": 3.0},
    },
    ("agm", "film"): {_C_R: {"alpha": 1.5}, _C_C: {"alpha": 3.0}},
    ("agm", "gated"): {_C_R: {"alpha": 3.0}, _C_C: {"alpha": 1.5}},
    ("agm", "tf"): {_C_R: {"alpha": 1.5}, _C_C: {"alpha": 1.5}},
    ("mlb", "linear"): {
        _C_R: {"alpha": 5.0},
        _C_C: {"alpha": 5.0},
        _A_R: {"alpha": 2.0},
        _U_R: {"alpha": 2.0},
    },
    ("mlb", "mlp"): {
        _C_R: {"alpha": 5.0},
        _C_C: {"alpha": 3.0},
        _A_R: {"alpha": 1.0},
        _U_R: {"alpha": 4.0},
    },
    ("mlb", "film"): {_C_R: {"alpha": 0.5}, _C_C: {"alpha": 4.0}},
    ("mlb", "gated"): {_C_R: {"alpha": 5.0}, _C_C: {"alpha": 5.0}},
    ("mlb", "tf"): {_C_R: {"alpha": 5.0}, _C_C: {"alpha": 2.0}},
}
"""Table 2 of the appendix. MLB's beta_max is 2 (the BMVC-era symmetric form; appendix B.1:
">= 2 shows no significant difference")."""

# Options every preset of a method gets, in both sets (the MLB codebase's behaviour).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlb": {"beta_max": 2.0},
    # Appendix B.2: AGM keeps its own gradient clipping (on the fused head's weights); the
    # official code masks the inputs and re-runs the whole model.
    "agm": {"clip": True, "masking": "input"},
    "pmr": {
        "prototypes": "explicit",
        "prototype_fraction": 0.1,
        "momentum": 0.0,
        "batch_norm": True,
    },  # the MLB authors' later code: eval-mode pass over 10 % of batches, BN, no EMA
}

JOURNAL_SETTINGS: dict[tuple[str, str], dict[str, Any]] = {
    ("cremad", "resnet18"): {
        "protocol": {
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "batch_size": 32,
            "warmup_steps": 780,
            "max_epochs": 1500,
            "patience": 100,
        },
        "methods": {
            "joint": {},
            "multiloss": {},
            "audio_only": {},
            "video_only": {},
            "mlb": {"alpha": 0.5, "beta_max": 10.0, "patience": 300},
            "ogm": {"alpha": 1.0},
            "agm": {"alpha": 3.0},
            "mslr": {"initial": [0.7, 1.3], "memory_epochs": 20},
            "mmcosine": {"scale": 10.0},
        },
        "fusions": {  # run.sh fusion ablations: MLB alpha 0.5 with these beta_max
            "mlp": {"mlb": {"alpha": 0.5, "beta_max": 5.0, "patience": 300}},
            "gated": {"mlb": {"alpha": 0.5, "beta_max": 10.0, "patience": 300}},
            "film": {"mlb": {"alpha": 0.5, "beta_max": 20.0, "patience": 300}},
            "tf": {"mlb": {"alpha": 0.5, "beta_max": 20.0, "patience": 300}},
        },
    },
    ("cremad", "conformer"): {
        "protocol": {
            "lr": 5e-5,
            "weight_decay": 5e-6,
            "batch_size": 8,
            "warmup_steps": 780,
            "max_epochs": 1500,
            "patience": 100,
        },
        "methods": {
            "joint": {},
            "multiloss": {},
            "audio_only": {},
            "video_only": {},
            "mlb": {"alpha": 5.0, "beta_max": 2.0, "patience": 300},
            "ogm": {"alpha": 1.0},
            "agm": {"alpha": 3.0},
            "mslr": {"initial": [0.9, 1.1], "memory_epochs": 5},
            "mmcosine": {"scale": 10.0},
        },
        "fusions": {},
    },
    ("ave", "resnet18"): {
        "protocol": {
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "batch_size": 32,
            "warmup_steps": 780,
            "max_epochs": 1500,
            "patience": 150,
        },
        "methods": {
            "joint": {},
            "multiloss": {},
            "audio_only": {},
            "video_only": {},
            "mlb": {"alpha": 2.0, "beta_max": 1.0},
            "ogm": {"alpha": 0.6},
            "agm": {"alpha": 3.0, "lr": 1e-4},
            "mslr": {"initial": [0.7, 1.3], "memory_epochs": 10},
            "mmcosine": {"scale": 10.0},
        },
        "fusions": {},
    },
    ("ucf101", "resnet18"): {
        "protocol": {
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "batch_size": 32,
            "warmup_steps": 780,
            "max_epochs": 1000,
            "patience": 100,
        },
        "methods": {
            "joint": {},
            "multiloss": {},
            "audio_only": {},
            "video_only": {},
            "mlb": {"alpha": 2.0, "beta_max": 0.5},
            "ogm": {"alpha": 0.8},
            "agm": {"alpha": 2.0},
            "mslr": {"initial": [0.9, 1.1], "memory_epochs": 5},
            "mmcosine": {"scale": 10.0},
        },
        "fusions": {},
    },
}
"""The authors' journal scripts (``run.sh``): per (dataset, backbone) the protocol
and each method's options; keys ``lr`` and ``patience`` inside a method override the protocol.
MSLR/MMCosine without a run.sh value use the config defaults (MSLR (0.9, 1.1), K 5; s 10)."""

NEWER_SETTINGS: dict[str, dict[str, Any]] = {
    "cggm": {"rho": 1.3, "lam": 0.05},
    "inforeg": {"strength": [0.95, 0.1], "threshold": 0.05, "trace_epochs": 10},
    "amss": {"temperature": 0.2, "offset": 0.5, "bias": 0.0, "parameters": "conv"},
    "amss_plus": {"temperature": 0.2, "offset": 0.5, "bias": 0.0, "parameters": "conv"},
    "opm": {"q_base": 0.5, "lam": 0.5, "p_exe": 0.7, "window": [6, 1500]},
}
"""Methods published after the paper: ``method -> options`` with the hyperparameters of the
method's own paper, each written as ``newer/cremad_resnet18_linear_<method>`` (CREMA-D,
ResNet-18, Late-Linear fusion, the protocol of appendix B.2 and Table 3's CREMA-D ResNet-18
settings), so that a new method runs under the same protocol as the paper's rows.

CGGM: the official code's rho 1.3 and its Food-101 lam 0.05 (the paper's one two-modality
classification task, as CREMA-D; CMU-MOSI and IEMOCAP use 0.2). InfoReg: the authors' CREMA-D
strengths (0.95 audio, 0.1 video), threshold 0.05 and a 10-epoch trace average. AMSS and AMSS+:
the official CREMA-D run's settings (temperature 0.2, offset 0.5, bias 0, the encoders' conv
kernels masked by output channel). OPM: the authors' script values (``q_base`` 0.5, ``lambda``
0.5, ``p_exe`` 0.7; their only published script, for Kinetics-Sounds) and their 6 warm-up epochs
without dropping (``window`` from epoch 6 to the protocol's last epoch; TOML has no
``None``)."""
