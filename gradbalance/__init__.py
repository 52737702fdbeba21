"""gradbalance: gradient-level modality balancing for multimodal PyTorch models.

Attach a balancer to your model, use its ``loss()`` in your own training loop, and call an
ordinary ``backward()``::

    bal = gb.MLB(model, encoders=[model.audio, model.video], num_classes=6)
    loss = bal.loss(model(audio, video), y)
    loss.backward()
"""

from gradbalance import coefficients, diagnostics, errors, integrations, registry, testing
from gradbalance.balancer import Balancer, Step
from gradbalance.heads import MMCosineHead
from gradbalance.history import History, HistoryTable, plot_history
from gradbalance.methods._base import Method
from gradbalance.methods.agm import AGM
from gradbalance.methods.amss import AMSS, AMSSPlus
from gradbalance.methods.cggm import CGGM
from gradbalance.methods.gblend import GBlend
from gradbalance.methods.inforeg import InfoReg
from gradbalance.methods.joint import Joint
from gradbalance.methods.mmpareto import MMPareto
from gradbalance.methods.mslr import MSLR
from gradbalance.methods.multiloss import MLB, MultiLoss
from gradbalance.methods.ogm import OGM, OGMGE
from gradbalance.methods.opm import OPM
from gradbalance.methods.pmr import PMR
from gradbalance.registry import METHODS, make, register_method, unregister_method

__version__ = "0.1.0"

__all__ = [
    "AGM",
    "AMSS",
    "CGGM",
    "METHODS",
    "MLB",
    "MSLR",
    "OGM",
    "OGMGE",
    "OPM",
    "PMR",
    "AMSSPlus",
    "Balancer",
    "GBlend",
    "History",
    "HistoryTable",
    "InfoReg",
    "Joint",
    "MMCosineHead",
    "MMPareto",
    "Method",
    "MultiLoss",
    "Step",
    "__version__",
    "coefficients",
    "diagnostics",
    "errors",
    "integrations",
    "make",
    "plot_history",
    "register_method",
    "registry",
    "testing",
    "unregister_method",
]
