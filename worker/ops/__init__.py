"""The op library: every op gradserve can run, each a numpy forward plus its VJP.

Importing this package fills the one registry (:data:`REGISTRY`); each module below registers a
family of ops with :func:`defop`.
"""

from gradserve.worker.ops.registry import (  # noqa: F401
    REGISTRY,
    OpContext,
    OpDef,
    OpError,
    defop,
    get_op,
    stand_in,
    unbroadcast,
)
from gradserve.worker.ops import elementwise  # noqa: F401,E402
from gradserve.worker.ops import unary  # noqa: F401,E402
from gradserve.worker.ops import activations  # noqa: F401,E402
from gradserve.worker.ops import linalg  # noqa: F401,E402
from gradserve.worker.ops import einsum  # noqa: F401,E402
from gradserve.worker.ops import reduce  # noqa: F401,E402
from gradserve.worker.ops import shape  # noqa: F401,E402
from gradserve.worker.ops import conv  # noqa: F401,E402
from gradserve.worker.ops import conv_transpose  # noqa: F401,E402
from gradserve.worker.ops import pool  # noqa: F401,E402
from gradserve.worker.ops import norm  # noqa: F401,E402
from gradserve.worker.ops import batchnorm  # noqa: F401,E402
from gradserve.worker.ops import loss  # noqa: F401,E402
from gradserve.worker.ops import index  # noqa: F401,E402
from gradserve.worker.ops import resize  # noqa: F401,E402
from gradserve.worker.ops import rnn  # noqa: F401,E402
