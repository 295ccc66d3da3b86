"""kshot: few-shot learning and meta-learning on PyTorch.

Episodic data (`kshot.data`), learners behind one interface (`kshot.learners`), a trainer and evaluator
(`kshot.training`, `kshot.evaluation`), and a Keras-like front door (`kshot.FewShotModel`).
"""

from kshot import data, learners
from kshot.api import AdaptedClassifier, FewShotModel
from kshot.config import ConfigError, TrainConfig
from kshot.episode import Episode
from kshot.evaluation import EvaluationResult, evaluate, mean_ci95
from kshot.recipe import Recipe, load_recipe

__version__ = "0.1.0"

__all__ = ["AdaptedClassifier", "ConfigError", "Episode", "EvaluationResult", "FewShotModel", "Recipe", "TrainConfig",
           "data", "evaluate", "learners", "load_recipe", "mean_ci95"]
