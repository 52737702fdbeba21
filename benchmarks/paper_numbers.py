"""The paper's published test accuracies (%, mean ± std over 3 folds): appendix E of the paper.

``TABLE3[(dataset, backbone)][method]`` and ``TABLE4[(fusion, backbone)][method]`` are
``(mean, std)`` pairs; method keys are the training harness's method names.

Table 4's first block is labelled "MLP" in the appendix, but its numbers equal Table 3's
Late-Linear column; it is kept under ``"mlp"`` as printed.
"""

from __future__ import annotations

from reference_models.recipes import METHODS

__all__ = ["METHOD_LABELS", "TABLE3", "TABLE4", "paper_accuracy"]

METHOD_LABELS: dict[str, str] = {name: recipe.label for name, recipe in METHODS.items()}
"""The paper's row label of each method."""

_T3_ROWS = {
    # method: (CREMA-D ResNet, CREMA-D Conformer, AVE ResNet, UCF101 ResNet)
    "video_only": ((55.4, 2.3), (69.4, 2.8), (62.6, 1.0), (30.3, 1.5)),
    "audio_only": ((60.6, 3.0), (76.8, 2.0), (45.7, 1.6), (38.3, 0.8)),
    "joint": ((62.6, 1.4), (75.1, 1.7), (66.7, 1.5), (47.7, 1.5)),
    "mmcosine": ((58.8, 1.6), (73.5, 2.1), (66.7, 0.9), (46.9, 3.6)),
    "mslr": ((56.5, 2.2), (77.1, 2.4), (66.8, 1.7), (47.9, 3.8)),
    "ogm": ((65.6, 3.8), (82.4, 1.0), (67.9, 0.5), (51.8, 1.9)),
    "pmr": ((53.7, 2.3), (80.5, 0.2), (37.4, 7.5), (40.9, 2.0)),
    "agm": ((69.3, 1.4), (78.5, 2.6), (65.8, 2.7), (50.5, 1.5)),
    "multiloss": ((69.2, 1.8), (82.6, 0.9), (70.1, 0.9), (51.1, 1.8)),
    "mlb": ((71.4, 1.9), (85.2, 0.9), (70.6, 1.4), (52.0, 2.2)),
}
_T3_COLUMNS = (
    ("cremad", "resnet18"),
    ("cremad", "conformer"),
    ("ave", "resnet18"),
    ("ucf101", "resnet18"),
)

TABLE3: dict[tuple[str, str], dict[str, tuple[float, float]]] = {
    column: {method: values[index] for method, values in _T3_ROWS.items()}
    for index, column in enumerate(_T3_COLUMNS)
}
"""Table 3 (Late-Linear fusion): ``TABLE3[(dataset, backbone)][method] = (mean, std)``."""

_T4_ROWS = {
    # method: MLP R, MLP C, FiLM R, FiLM C, Gated R, Gated C, TF R, TF C
    "joint": (
        (62.6, 1.4),
        (75.1, 1.7),
        (64.8, 1.1),
        (73.8, 1.5),
        (59.1, 4.7),
        (71.7, 2.5),
        (58.7, 2.2),
        (71.0, 2.5),
    ),
    "agm": (
        (69.3, 1.4),
        (78.5, 2.6),
        (57.8, 1.3),
        (68.9, 0.6),
        (55.7, 4.7),
        (69.0, 0.7),
        (54.0, 4.5),
        (70.9, 0.7),
    ),
    "multiloss": (
        (69.2, 1.8),
        (82.6, 0.9),
        (68.3, 2.9),
        (84.7, 0.7),
        (70.7, 2.4),
        (83.3, 1.1),
        (69.7, 3.4),
        (83.4, 1.5),
    ),
    "mlb": (
        (71.4, 1.9),
        (85.2, 0.9),
        (72.2, 0.5),
        (84.4, 0.5),
        (71.1, 1.7),
        (84.2, 1.4),
        (69.7, 1.1),
        (85.5, 0.9),
    ),
}
_T4_COLUMNS = tuple(
    (fusion, backbone)
    for fusion in ("mlp", "film", "gated", "tf")
    for backbone in ("resnet18", "conformer")
)

TABLE4: dict[tuple[str, str], dict[str, tuple[float, float]]] = {
    column: {method: values[index] for method, values in _T4_ROWS.items()}
    for index, column in enumerate(_T4_COLUMNS)
}
"""Table 4 (CREMA-D, fusion methods): ``TABLE4[(fusion, backbone)][method] = (mean, std)``."""


def paper_accuracy(
    table: int, dataset: str, backbone: str, fusion: str, method: str
) -> tuple[float, float] | None:
    """The paper's ``(mean, std)`` test accuracy (%) of one cell, or ``None`` if not reported.

    Example:
        >>> paper_accuracy(3, "cremad", "resnet18", "linear", "mlb")
        (71.4, 1.9)
        >>> paper_accuracy(4, "cremad", "conformer", "tf", "joint")
        (71.0, 2.5)
        >>> paper_accuracy(3, "synthetic", "resnet18", "linear", "mlb") is None
        True
    """
    if table == 3:
        return TABLE3.get((dataset, backbone), {}).get(method)
    if table == 4 and dataset == "cremad":
        return TABLE4.get((fusion, backbone), {}).get(method)
    return None
