"""The one linear probe of retina_jax (docs/methods.md, "FLAIR": Transfer protocols; "ViLReF":
Evaluation): L2-regularised logistic regression on frozen pre-projection image features, fitted by
scikit-learn's lbfgs to convergence. Both transfer evaluations use it:

- single-label (FLAIR's `LinearProbe`, jusiro/FLAIR `flair/transferability/modeling/adapters.py`):
  one multinomial `LogisticRegression(C=0.316, class_weight='balanced', max_iter=1000,
  random_state=0)` on the raw features; its scores are the softmax probabilities;
- multi-label (ViLReF's sigmoid heads, ViLReF section 4.2): one binary logistic regression per
  finding (one-vs-rest), on train-standardised features; its scores are the per-finding sigmoids. A
  finding with no positive (or no negative) in train is scored by that constant.

The objective of one head is `sum_i w_i CE_i + ||W||^2 / (2 C)` (the intercept is not penalised),
strictly convex, so its optimum does not depend on the solver: an independent solver reaches the same
probabilities (tests/test_transfer.py checks this against scipy).
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

FLAIR_C = 0.316  # FLAIR's LinearProbe
MAX_ITER = 1000


def fit_predict(train_x, train_y, test_x, *, num_classes: int, c: float = FLAIR_C, balanced: bool = False,
                standardize: bool = False, max_iter: int = MAX_ITER) -> tuple[np.ndarray, dict]:
    """Fit on `train_x` [N, F] with class ids [N] (softmax) or multi-hot labels [N, C] (sigmoids) and
    score `test_x`: returns ([M, num_classes] probabilities, {'iterations': lbfgs iterations}).

    Single-label: a class absent from train gets probability 0. `balanced` weights each class by
    N / (classes x its count) (sklearn's 'balanced'); `standardize` scales the features to the train
    split's zero mean and unit variance first.
    """
    train_x, test_x, train_y = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64), np.asarray(train_y)
    multilabel = train_y.ndim == 2
    if train_x.ndim != 2 or len(train_x) != len(train_y) or train_y.ndim not in (1, 2) or \
            (multilabel and train_y.shape[1] != num_classes) or test_x.ndim != 2 or test_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"linear probe: features [N, F], labels [N] or [N, {num_classes}] and test features "
                         f"[M, F] expected, got {train_x.shape}, {train_y.shape} and {test_x.shape}")
    if not multilabel and len(np.unique(train_y)) < 2:
        raise ValueError(f"the linear probe needs at least 2 classes in train, got {np.unique(train_y).tolist()}")
    head = LogisticRegression(C=c, class_weight="balanced" if balanced else None, max_iter=max_iter,
                              random_state=0)
    if multilabel:
        head = OneVsRestClassifier(head)
    model = make_pipeline(StandardScaler(), head) if standardize else head
    with warnings.catch_warnings():
        # OneVsRest scores a finding that is constant in train by that constant, and says so per finding.
        warnings.filterwarnings("ignore", message="Label not .* is present in all training examples")
        model.fit(train_x, train_y)
    fitted = model[-1] if standardize else model
    if multilabel:
        scores = np.asarray(model.predict_proba(test_x), np.float64)
        iterations = max([int(np.max(e.n_iter_)) for e in fitted.estimators_ if hasattr(e, "n_iter_")] or [0])
    else:
        scores = np.zeros((len(test_x), num_classes))
        scores[:, fitted.classes_] = model.predict_proba(test_x)
        iterations = int(np.max(fitted.n_iter_))
    return scores, {"iterations": iterations}
