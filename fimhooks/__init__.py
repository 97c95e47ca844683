"""fimhooks: online diagonal Fisher information estimates with their variance.

Attach a ``FisherMonitor`` to a model, run the ordinary backward pass inside
``with monitor:``, and read ``monitor.estimates()``.
"""

from fimhooks import optim
from fimhooks.estimates import FisherEstimates
from fimhooks.fisher.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood
from fimhooks.monitor import FisherMonitor
from fimhooks.oneshot import estimate

__all__ = [
    "Bernoulli",
    "Categorical",
    "FisherEstimates",
    "FisherMonitor",
    "Gaussian",
    "Likelihood",
    "estimate",
    "optim",
]
__version__ = "0.1.0"
