"""lrpcli: Layer-wise Relevance Propagation for PyTorch models, as a library and a batch command line tool.

    import lrpcli
    relevance = lrpcli.attribute(model, x, target, composite="epsilon_gamma_box", canonizers=["vgg"])
"""

__version__ = "0.1.0"

from . import canonizers, composites, rules  # noqa: E402
from .attribute import attribute, initial_relevance  # noqa: E402
from .hooks import Session, UnhandledModuleWarning, rules_off  # noqa: E402
from .modules import Sum  # noqa: E402
from .recorder import Recorder  # noqa: E402
from .rules import Stabilizer  # noqa: E402

__all__ = ["attribute", "initial_relevance", "composites", "rules", "canonizers", "Sum", "Stabilizer", "Session",
           "Recorder", "rules_off", "UnhandledModuleWarning", "__version__"]
