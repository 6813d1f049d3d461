"""Softmax cross-entropy for Keras 3 on TensorFlow.

The losses here are drop-in replacements for Keras' categorical
cross-entropies whose backward pass is the closed-form `softmax(z) - y`,
compiled by XLA for GPU and TPU, with z-loss, logit soft-capping, label
smoothing for integer labels, any class axis and exact integer labels.
`LinearSoftmaxCrossEntropy` fuses an output projection with the loss
without holding the `[tokens, vocabulary]` logits, and the export helpers
save models and training functions with their custom gradients kept.
"""

try:
    import tensorflow as _tf  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "keras_softmax_ce needs TensorFlow, which it leaves to an extra so "
        "that an existing TensorFlow build is kept. Install one with "
        "`pip install 'keras-softmax-ce[cpu]'` (tensorflow-cpu) or "
        "`pip install 'keras-softmax-ce[gpu]'` (tensorflow with CUDA); on a "
        "TPU VM install the TPU build of TensorFlow first."
    ) from error

import keras as _keras

if _keras.backend.backend() != "tensorflow":
    raise ImportError(
        "keras_softmax_ce runs on Keras' TensorFlow backend, but Keras is "
        f"set to {_keras.backend.backend()!r}. Set the environment variable "
        "KERAS_BACKEND=tensorflow before importing keras."
    )

from keras_softmax_ce._export import (
    ExportMismatchError as ExportMismatchError,
)
from keras_softmax_ce._export import (
    LossAndGradientsModule as LossAndGradientsModule,
)
from keras_softmax_ce._export import export_serving as export_serving
from keras_softmax_ce._export import save_arrays as save_arrays
from keras_softmax_ce._export import save_keras_model as save_keras_model
from keras_softmax_ce._export import (
    save_training_module as save_training_module,
)
from keras_softmax_ce._head import FusedHeadModel as FusedHeadModel
from keras_softmax_ce._head import (
    LinearSoftmaxCrossEntropy as LinearSoftmaxCrossEntropy,
)
from keras_softmax_ce._head import (
    linear_softmax_cross_entropy as linear_softmax_cross_entropy,
)
from keras_softmax_ce._losses import (
    CategoricalCrossentropy as CategoricalCrossentropy,
)
from keras_softmax_ce._losses import (
    SparseCategoricalCrossentropy as SparseCategoricalCrossentropy,
)
from keras_softmax_ce._ops import (
    softmax_cross_entropy as softmax_cross_entropy,
)
from keras_softmax_ce._ops import (
    sparse_softmax_cross_entropy as sparse_softmax_cross_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "CategoricalCrossentropy",
    "ExportMismatchError",
    "FusedHeadModel",
    "LinearSoftmaxCrossEntropy",
    "LossAndGradientsModule",
    "SparseCategoricalCrossentropy",
    "export_serving",
    "linear_softmax_cross_entropy",
    "save_arrays",
    "save_keras_model",
    "save_training_module",
    "softmax_cross_entropy",
    "sparse_softmax_cross_entropy",
]
