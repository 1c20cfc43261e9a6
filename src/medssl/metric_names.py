"""The metric registry: each list of metric names medssl uses, once, by what it is for.

Names only (no numpy), so config.py validates `export.select_metric` against it without making every
stage depend on how the metrics are computed (src/medssl/metrics.py).
"""
SELECTABLE = ("accuracy", "balanced_accuracy", "auc_macro", "kappa", "kappa_quadratic", "f1_macro")  # export.select_metric
SCORED = (*SELECTABLE, "ece")       # kept per grid cell and split (with recall_<class>)
LOGGED = (*SCORED, "loss", "sensitivity", "specificity")  # logged per split to MLflow; the last two: binary tasks only
BRIEF = ("accuracy", "balanced_accuracy", "auc_macro")  # one-line summaries: registry tags, the cells table, ONNX check
TABLE = ("accuracy", "balanced_accuracy", "auc_macro", "kappa", "f1_macro")  # the report's tables (+ task metrics)
GAP = ("accuracy", "balanced_accuracy")  # a grid cell's train - val gap
CURVE = ("loss", *GAP)                # per-epoch curves: train_, val_ and gap_ each
PAIRED = ("balanced_accuracy", "auc_macro")  # paired bootstrap differences between inits
LABEL = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auc_macro": "macro AUC", "kappa": "Cohen's κ",
         "kappa_quadratic": "quadratic κ", "f1_macro": "macro F1", "sensitivity": "sensitivity",
         "specificity": "specificity"}  # how tables headed for people name them
