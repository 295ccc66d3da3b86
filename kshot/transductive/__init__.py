"""Transductive few-shot inference on fixed features: each method labels one task's queries together, using the
unlabelled query set as well as the support set, and returns log-probabilities [Q, N] (so that their softmax
is the method's class probabilities and calibration can be measured).

| method | module | idea |
|---|---|---|
| TIM-GD (Boudiaf et al. 2020) | `tim.py` | support cross-entropy + mutual information of queries and labels, Adam |
| BD-CSPN (Liu et al. 2020) | `bd_cspn.py` | prototypes rectified by shifted, pseudo-labelled queries; cosine |
| PT-MAP (Hu et al. 2021) | `pt_map.py` | power transform, class-balanced Sinkhorn soft labels, MAP centres |
| LaplacianShot (Ziko et al. 2020) | `laplacianshot.py` | nearest prototype + kNN Laplacian, bound optimisation |

Each function takes support features [S, D], support labels [S] in 0..N-1, query features [Q, D] and N, plus
the method's options (defaults: the authors' code, cited in each module), and is deterministic. Import them
from their modules (`from kshot.transductive.tim import tim`): the package does not re-export them, so that
`kshot.transductive.tim` stays the module. The learners that use them (`kshot.learners.transductive`) embed
images and normalise features as each paper does.
"""

from __future__ import annotations
