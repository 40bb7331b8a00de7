"""cvjax: JAX/Flax computer-vision models, exact custom ops and one launcher."""

from cvjax import ops  # noqa: F401
from cvjax import models  # noqa: F401
from cvjax import convert  # noqa: F401

__version__ = "0.1.0"
